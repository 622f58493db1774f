"""One declarative architecture map per model family; each module defines ARCH."""
