"""Progress: long loops report to the installed reporter (what `mechanic run` draws), in order, with totals;
without one they stay silent unless asked; only rank 0 reports under torch.distributed."""

from mechanic.progress import counter, reporting, track


def test_track_reports_every_item_to_the_reporter_in_order():
    seen = []
    with reporting(lambda d, done, total, info: seen.append((d, done, total))):
        assert list(track(range(3), "loop")) == [0, 1, 2]
        with counter("tokens", 10, unit="tok") as c:
            c.update(4, fvu=0.5)
            c.update(6)
    assert seen == [("loop", 0, 3), ("loop", 1, 3), ("loop", 2, 3), ("loop", 3, 3),
                    ("tokens", 0, 10), ("tokens", 4, 10), ("tokens", 10, 10)]
    assert list(track(iter("ab"), "silent")) == ["a", "b"]          # no reporter, show=False: nothing printed


def test_long_stages_report_progress(word_tokenizer, tmp_path, monkeypatch):
    """Second moments, ROME's optimisation and sequential batches all report (the demo's silent minutes)."""
    import mechanic
    from mechanic.steer.edit import Fact
    from mechanic.steer.sequential import sequential
    from mechanic.testing.tiny import tiny_model

    monkeypatch.setenv("MECHANIC_CACHE", str(tmp_path))
    m = mechanic.load(tiny_model("llama", vocab_size=len(word_tokenizer)), tokenizer=word_tokenizer)
    facts = [Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
             Fact("The river Thames flows through the city of", "The river Thames", " Berlin", " London")]
    seen = []
    with reporting(lambda d, done, total, info: seen.append((d, done, total))):
        sequential(m, facts, "rome", 1, [0], steps=2, stats_tokens=1000, n_prefixes=2, progress=False)
    descs = [d for d, _, _ in seen]
    assert any(d.startswith("second moments") for d in descs)
    assert any(d.startswith("optimising 'The Eiffel Tower'") for d in descs)
    batches = [(done, total) for d, done, total in seen if d.startswith("rome: 2 facts")]
    assert batches == [(0, 2), (1, 2), (2, 2)]


def test_only_rank_zero_reports(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    seen = []
    with reporting(lambda *a: seen.append(a)):
        list(track(range(2), "loop"))
    assert seen == []
