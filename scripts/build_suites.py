"""Build the built-in task suites (JSONL files under src/mechanic/tasks/suites/) from templates, filtered with a model.

The JSONL files are the shipped product; this script is how they were made, kept so they can be
rebuilt or extended. Deterministic (fixed seed). Usage:

    python scripts/build_suites.py [--model smollm2] [--out DIR] [--only ioi,facts]

Prints each suite's size and the model's accuracy before/after filtering (numbers in docs/TASKS.md).

Splits: every row gets a "split" label ("train" / "validation" / "test") such that the entity sets of the
three splits are pairwise disjoint (entities per suite: mechanic.tasks.splits.ENTITIES). Each suite's
entity pool (names, professions, subjects, items, query phrases, event nouns, sums) is partitioned into
the splits before the rows are labelled (`partition`: seeded, stratified, 2:1:2); a row takes the split of
its entities; a corrupted partner drawn from another split is re-drawn from the row's split (or, when there
is none, the row is left out), so a rebuild reproduces the labels. `docs/TASKS.md` lists the sizes
(`python scripts/build_suites.py --sizes` prints them from the shipped files, without a model).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

SEED = 0
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mechanic"   # the source tree this script sits beside
SUITES_DIR = PACKAGE / "tasks" / "suites"
SPLITS = ("train", "validation", "test")
# Entities are dealt to the splits in this cycle (2 train : 1 validation : 2 test), per stratum in turn.
PATTERN = ("train", "test", "validation", "train", "test")


def partition(strata, name: str) -> dict[str, str]:
    """{entity: split}: each stratum (a list of entities, or of tuples of entities that must stay together)
    is shuffled with a generator seeded by SEED and `name`, then PATTERN is dealt over it, continuing from
    one stratum to the next, so every stratum of 3+ units is spread over all three splits in about 2:1:2."""
    rng = random.Random(f"{SEED}:{name}")
    out: dict[str, str] = {}
    k = 0
    for stratum in strata:
        units = [u if isinstance(u, tuple) else (u,) for u in stratum]
        units = [u for u in dict.fromkeys(units) if not any(x in out for x in u)]
        rng.shuffle(units)
        for u in units:
            for x in u:
                out[x] = PATTERN[k % len(PATTERN)]
            k += 1
    return out


def label(rows: list[dict], suite: str, split_of: dict[str, str], grow: bool = False) -> list[dict]:
    """Set each row's "split" to the split of its entities (mechanic.tasks.splits.entities); rows whose
    entities lie in two splits are left out. grow=True: an entity not in `split_of` joins the split of the
    row's known entities the first time it is seen (so a later row in another split that has it is left out)."""
    from mechanic.tasks.splits import entities
    from mechanic.tasks.task import Example

    out = []
    for r in rows:
        ents = entities(Example(r["prompt"], r["answer"], meta=r["meta"]), suite)
        known = {split_of[e] for e in ents if e in split_of}
        unknown = [e for e in ents if e not in split_of]
        if not known or (unknown and not grow):
            raise KeyError(f"{suite}: no split for the entities {sorted(unknown)} of {r['prompt']!r}")
        if len(known) > 1:      # its entities straddle splits
            continue
        (r["split"],) = known
        for e in unknown:
            split_of[e] = r["split"]
        out.append(r)
    return out

# ---------------------------------------------------------------------------------------------
# IOI
# ---------------------------------------------------------------------------------------------

# Names that are one token with a leading space for SmolLM2 (checked again at build time).
NAMES = ("John Mary Tom James Michael David Sarah Emma Anna Paul Mark Lisa Kate Peter Alice Bob Jack Susan "
         "Laura Daniel Chris Jessica Kevin Brian Steven Rachel Amy Karen Nancy Linda George Richard Robert "
         "William Thomas Charles Andrew Ryan Eric Adam Jason Emily Hannah Grace Jane Helen Julia Rose Sam "
         "Ben Max Tim Joe Jim Bill Fred Henry Frank Maria Michelle Lucy Sophie Oscar Harry Jacob Luke Alex "
         "Scott Simon Tony Carl Arthur Edward Martin Roger Kelly Carol Nick Ian").split()
# {X} {Y}: first mentions (ABBA: X=IO, Y=S; BABA: X=S, Y=IO); {S}: the second mention of the subject.
IOI_TEMPLATES = [
    "When {X} and {Y} went to the {place}, {S} gave a {obj} to",
    "Then, {X} and {Y} went to the {place}. {S} gave a {obj} to",
    "After {X} and {Y} arrived at the {place}, {S} handed a {obj} to",
    "While {X} and {Y} were working at the {place}, {S} gave a {obj} to",
    "Then, {X} and {Y} had a long argument. Afterwards {S} said to",
    "When {X} and {Y} got a {obj} at the {place}, {S} decided to give it to",
    "Yesterday {X} and {Y} met at the {place}, and {S} passed the {obj} to",
    "As {X} and {Y} left the {place}, {S} sent a {obj} to",
]
PLACES = "store park school office hospital restaurant station beach garden library market church".split()
OBJECTS = "drink book ball letter gift bag key phone ring pen ticket basket".split()


# The split of the k-th row of every (template, order) cell: 3 train, 1 validation, 4 test of 8.
IOI_CELL = ("train", "test", "train", "test", "validation", "train", "test", "test")


def ioi_names(tok) -> dict[str, str]:
    """{name: split}: the names that are one token with a leading space, partitioned 2:1:2."""
    return partition([[n for n in NAMES if len(tok(" " + n, add_special_tokens=False)["input_ids"]) == 1]], "ioi")


def build_ioi(tok, rng: random.Random, per_cell: int = 8) -> list[dict]:
    """Templates x orders x random name triples. Corruption "ABC": the second mention of the subject (S2)
    is replaced by a third name C, so nothing in the prompt says which of IO/S is the answer. The k-th row
    of each cell is in split IOI_CELL[k] and draws its three names from that split's names only."""
    split_of = ioi_names(tok)
    pools = {sp: [n for n, s in split_of.items() if s == sp] for sp in SPLITS}
    out = []
    for ti, tpl in enumerate(IOI_TEMPLATES):
        for order in ("ABBA", "BABA"):
            for k in range(per_cell):
                split = IOI_CELL[k % len(IOI_CELL)]
                io, s, c = rng.sample(pools[split], 3)
                x, y = (io, s) if order == "ABBA" else (s, io)
                fill = dict(place=rng.choice(PLACES), obj=rng.choice(OBJECTS))
                prompt = tpl.format(X=x, Y=y, S=s, **fill)
                out.append(dict(
                    prompt=prompt, answer=" " + io, wrong=" " + s, split=split,
                    corrupted=tpl.format(X=x, Y=y, S=c, **fill),
                    meta=dict(template=ti, order=order, IO=io, S=s, C=c,
                              corruption="ABC: S2 replaced by a third name C",
                              flipped=tpl.format(X=x, Y=y, S=io, **fill))))
    return out


# ---------------------------------------------------------------------------------------------
# Facts (CounterFact form)
# ---------------------------------------------------------------------------------------------

# relation: (templates: the first is the prompt, the rest paraphrases, "{}" = subject), {target: subjects}
FACTS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "city_country": (["{} is a city in the country of", "{} is located in the country of",
                      "The city of {} lies in the country of"], {
        "France": ["Paris", "Lyon", "Marseille", "Toulouse", "Bordeaux", "Nice", "Strasbourg"],
        "Germany": ["Berlin", "Munich", "Hamburg", "Frankfurt", "Cologne", "Stuttgart", "Dresden"],
        "Italy": ["Rome", "Milan", "Naples", "Venice", "Florence", "Turin", "Bologna"],
        "Spain": ["Madrid", "Barcelona", "Seville", "Valencia", "Bilbao"],
        "Japan": ["Tokyo", "Osaka", "Kyoto", "Hiroshima", "Yokohama"],
        "China": ["Beijing", "Shanghai", "Shenzhen", "Guangzhou"],
        "India": ["Mumbai", "Bangalore", "Kolkata", "Chennai", "Hyderabad"],
        "Russia": ["Moscow", "Saint Petersburg", "Novosibirsk"],
        "Canada": ["Toronto", "Vancouver", "Montreal", "Ottawa", "Calgary"],
        "Australia": ["Sydney", "Melbourne", "Brisbane", "Perth"],
        "Brazil": ["Rio de Janeiro", "São Paulo", "Salvador"],
        "Egypt": ["Cairo", "Alexandria", "Luxor"],
        "England": ["London", "Manchester", "Liverpool", "Birmingham"],
        "Mexico": ["Guadalajara", "Monterrey", "Tijuana"],
        "Turkey": ["Istanbul", "Ankara", "Izmir"],
        "Greece": ["Athens", "Thessaloniki"],
        "Poland": ["Warsaw", "Krakow"],
        "Argentina": ["Buenos Aires", "Rosario", "Mendoza"],
    }),
    "landmark_city": (["{} is located in the city of", "{} can be found in the city of",
                       "Tourists visit {} in the city of"], {
        "Paris": ["the Eiffel Tower", "the Louvre Museum", "the Arc de Triomphe", "Notre-Dame Cathedral"],
        "Rome": ["the Colosseum", "the Trevi Fountain", "the Pantheon", "the Roman Forum"],
        "London": ["Big Ben", "Tower Bridge", "Buckingham Palace", "the British Museum", "Westminster Abbey"],
        "New York": ["the Statue of Liberty", "the Empire State Building", "Central Park", "Times Square",
                     "the Brooklyn Bridge"],
        "Berlin": ["the Brandenburg Gate", "the Reichstag building", "Checkpoint Charlie"],
        "Moscow": ["the Kremlin", "Red Square", "Saint Basil's Cathedral"],
        "Barcelona": ["the Sagrada Familia", "Park Güell", "Camp Nou"],
        "San Francisco": ["the Golden Gate Bridge", "Alcatraz Island", "Fisherman's Wharf"],
        "Beijing": ["the Forbidden City", "Tiananmen Square", "the Temple of Heaven"],
        "Athens": ["the Acropolis", "the Parthenon"],
        "Venice": ["St. Mark's Basilica", "the Rialto Bridge", "the Grand Canal"],
        "Agra": ["the Taj Mahal"],
        "Dubai": ["the Burj Khalifa", "the Palm Jumeirah"],
        "Seattle": ["the Space Needle", "Pike Place Market"],
        "Washington": ["the White House", "the Lincoln Memorial", "the Capitol building"],
        "Istanbul": ["the Hagia Sophia", "the Blue Mosque", "the Grand Bazaar"],
        "Amsterdam": ["the Anne Frank House", "the Rijksmuseum"],
        "Madrid": ["the Prado Museum", "the Santiago Bernabéu Stadium"],
        "Vienna": ["Schönbrunn Palace", "St. Stephen's Cathedral"],
        "Copenhagen": ["Tivoli Gardens", "the Little Mermaid statue"],
        "Tokyo": ["Shibuya Crossing", "the Senso-ji temple"],
        "Cairo": ["the Egyptian Museum", "Tahrir Square"],
    }),
    "capital": (["The capital city of {} is", "The capital of {} is the city of",
                 "The government of {} sits in the capital city of"], {
        "Paris": ["France"], "Rome": ["Italy"], "London": ["the United Kingdom"], "Berlin": ["Germany"],
        "Moscow": ["Russia"], "Beijing": ["China"], "Tokyo": ["Japan"], "Madrid": ["Spain"],
        "Athens": ["Greece"], "Cairo": ["Egypt"], "Ankara": ["Turkey"], "Ottawa": ["Canada"],
        "Canberra": ["Australia"], "Warsaw": ["Poland"], "Vienna": ["Austria"], "Budapest": ["Hungary"],
        "Lisbon": ["Portugal"], "Stockholm": ["Sweden"], "Oslo": ["Norway"], "Copenhagen": ["Denmark"],
        "Helsinki": ["Finland"], "Dublin": ["Ireland"], "Nairobi": ["Kenya"], "Lima": ["Peru"],
        "Bangkok": ["Thailand"], "Seoul": ["South Korea"], "Jakarta": ["Indonesia"], "Tehran": ["Iran"],
        "Amsterdam": ["the Netherlands"], "Brussels": ["Belgium"], "Prague": ["the Czech Republic"],
        "Havana": ["Cuba"], "Hanoi": ["Vietnam"], "Manila": ["the Philippines"], "Riyadh": ["Saudi Arabia"],
        "Washington": ["the United States"], "Buenos Aires": ["Argentina"],
    }),
    "language": (["The official language of {} is", "In {}, the official language is",
                  "Most people in {} speak the language"], {
        "French": ["France", "Senegal", "Haiti"],
        "Spanish": ["Spain", "Mexico", "Colombia", "Peru", "Chile", "Cuba", "Venezuela"],
        "Portuguese": ["Portugal", "Brazil", "Angola", "Mozambique"],
        "German": ["Germany", "Austria"],
        "Italian": ["Italy", "San Marino"],
        "Arabic": ["Egypt", "Saudi Arabia", "Iraq", "Jordan", "Syria"],
        "Japanese": ["Japan"], "Russian": ["Russia"], "Greek": ["Greece", "Cyprus"],
        "Turkish": ["Turkey"], "Dutch": ["the Netherlands"], "Swedish": ["Sweden"],
        "Polish": ["Poland"], "Korean": ["South Korea"], "Finnish": ["Finland"],
    }),
    "native_language": (["The mother tongue of {} is", "The native language of {} is",
                         "{} grew up speaking"], {
        "French": ["Victor Hugo", "Emmanuel Macron", "Jacques Chirac", "Voltaire", "Albert Camus"],
        "Spanish": ["Miguel de Cervantes", "Gabriel García Márquez", "Pablo Neruda"],
        "German": ["Angela Merkel", "Johann Wolfgang von Goethe", "Friedrich Nietzsche"],
        "Italian": ["Dante Alighieri", "Silvio Berlusconi", "Umberto Eco"],
        "Russian": ["Vladimir Putin", "Leo Tolstoy", "Fyodor Dostoevsky"],
        "Japanese": ["Haruki Murakami", "Hayao Miyazaki"],
        "Portuguese": ["José Saramago", "Paulo Coelho"],
        "Dutch": ["Vincent van Gogh", "Rembrandt"],
    }),
    "continent": (["{} is a country in the continent of", "{} is located on the continent of",
                   "The country of {} is part of the continent of"], {
        "Europe": ["France", "Germany", "Italy", "Spain", "Poland", "Sweden", "Norway", "Portugal", "Austria"],
        "Asia": ["China", "Japan", "India", "Thailand", "Vietnam", "Indonesia", "Nepal", "Mongolia"],
        "Africa": ["Nigeria", "Kenya", "Ethiopia", "Ghana", "Morocco", "Senegal", "Uganda", "Tanzania"],
        "South America": ["Brazil", "Argentina", "Chile", "Peru", "Colombia", "Venezuela", "Bolivia"],
    }),
    "currency": (["The official currency of {} is the", "In {}, people pay with the",
                  "The money used in {} is the"], {
        "euro": ["Germany", "France", "Italy", "Spain", "Portugal", "Greece", "Ireland", "Austria"],
        "yen": ["Japan"], "rupee": ["India", "Pakistan", "Nepal", "Sri Lanka"],
        "peso": ["Mexico", "Argentina", "Chile", "Colombia"],
        "dollar": ["the United States", "Canada", "Australia", "New Zealand"],
        "pound": ["the United Kingdom"], "ruble": ["Russia", "Belarus"], "yuan": ["China"],
        "won": ["South Korea"], "lira": ["Turkey"],
    }),
    "company_country": (["{} is a company based in the country of", "The company {} is headquartered in",
                         "{} was founded in the country of"], {
        "Japan": ["Toyota", "Honda", "Nissan", "Sony", "Nintendo", "Panasonic", "Mitsubishi", "Canon"],
        "Germany": ["BMW", "Volkswagen", "Siemens", "Adidas", "Bosch", "Porsche", "Lufthansa"],
        "Italy": ["Fiat", "Ferrari", "Gucci", "Prada", "Lamborghini"],
        "France": ["Renault", "Peugeot", "Chanel", "Michelin", "Louis Vuitton"],
        "Sweden": ["IKEA", "Volvo", "Spotify", "Ericsson"],
        "South Korea": ["Samsung", "Hyundai", "Kia"],
        "Switzerland": ["Nestlé", "Rolex"],
        "China": ["Huawei", "Alibaba", "Lenovo"],
        "Finland": ["Nokia"],
    }),
    "product_company": (["{} is a product made by", "{} was developed by the company",
                         "the company behind {} is"], {
        "Apple": ["the iPhone", "the iPad", "the MacBook", "the iPod", "iTunes"],
        "Microsoft": ["Windows", "the Xbox", "Bing", "Internet Explorer"],
        "Google": ["Android", "Gmail", "Chrome"],
        "Sony": ["the PlayStation", "the Walkman"],
        "Toyota": ["the Corolla", "the Camry", "the Prius"],
        "Ford": ["the Mustang", "the Model T"],
        "Amazon": ["the Kindle", "Alexa"],
        "Nintendo": ["the Game Boy", "the Wii"],
    }),
    "athlete_sport": (["{} is famous for playing", "{} is a professional player of",
                       "The sport {} is best known for is"], {
        "basketball": ["Michael Jordan", "LeBron James", "Kobe Bryant", "Stephen Curry", "Shaquille O'Neal",
                       "Magic Johnson"],
        "tennis": ["Roger Federer", "Serena Williams", "Rafael Nadal", "Novak Djokovic", "Andre Agassi"],
        "golf": ["Tiger Woods", "Jack Nicklaus", "Arnold Palmer", "Phil Mickelson"],
        "soccer": ["Lionel Messi", "Cristiano Ronaldo", "Pelé", "David Beckham", "Diego Maradona"],
        "baseball": ["Babe Ruth", "Derek Jeter", "Barry Bonds"],
        "hockey": ["Wayne Gretzky", "Sidney Crosby"],
        "cricket": ["Sachin Tendulkar", "Virat Kohli"],
    }),
    "instrument": (["{} was famous for playing the", "{} was a musician who played the",
                    "The instrument {} is known for is the"], {
        "guitar": ["Jimi Hendrix", "Eric Clapton", "Jimmy Page", "B.B. King", "Carlos Santana"],
        "piano": ["Frédéric Chopin", "Franz Liszt", "Glenn Gould"],
        "trumpet": ["Louis Armstrong", "Miles Davis", "Dizzy Gillespie"],
        "violin": ["Niccolò Paganini", "Itzhak Perlman"],
        "saxophone": ["John Coltrane", "Charlie Parker"],
    }),
}


# More relations and subjects for `facts_large` (editing at scale: hundreds of facts). Same form as FACTS;
# a relation needs 3+ subjects per target so every fact has neighbourhood prompts with its true answer.
FACTS_MORE: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "city_country": (FACTS["city_country"][0], {
        "France": ["Lille", "Nantes", "Montpellier", "Rennes", "Grenoble", "Cannes", "Avignon", "Reims"],
        "Germany": ["Düsseldorf", "Leipzig", "Bremen", "Hanover", "Nuremberg", "Dortmund", "Heidelberg", "Bonn"],
        "Italy": ["Genoa", "Palermo", "Verona", "Pisa", "Siena", "Bari"],
        "Spain": ["Malaga", "Granada", "Zaragoza", "Pamplona", "Salamanca"],
        "Japan": ["Nagoya", "Sapporo", "Kobe", "Fukuoka", "Nagasaki", "Sendai"],
        "China": ["Wuhan", "Chengdu", "Nanjing", "Tianjin", "Hangzhou", "Chongqing"],
        "India": ["Delhi", "Jaipur", "Pune", "Ahmedabad", "Lucknow", "Agra"],
        "Russia": ["Kazan", "Vladivostok", "Yekaterinburg", "Sochi", "Murmansk"],
        "Canada": ["Winnipeg", "Edmonton", "Quebec City", "Halifax", "Victoria"],
        "Australia": ["Adelaide", "Darwin", "Hobart", "Gold Coast"],
        "Brazil": ["Recife", "Fortaleza", "Curitiba", "Manaus"],
        "Egypt": ["Giza", "Aswan", "Port Said"],
        "England": ["Leeds", "Bristol", "Sheffield", "Newcastle", "Nottingham"],
        "Mexico": ["Cancún", "Acapulco", "Puebla", "Oaxaca"],
        "Turkey": ["Antalya", "Bursa", "Konya"],
        "Greece": ["Patras", "Heraklion", "Rhodes"],
        "Poland": ["Gdansk", "Wroclaw", "Poznan", "Lodz"],
        "Argentina": ["La Plata", "Mar del Plata", "Salta"],
        "Portugal": ["Porto", "Braga", "Coimbra", "Faro"],
        "Sweden": ["Gothenburg", "Malmö", "Uppsala"],
        "Norway": ["Bergen", "Trondheim", "Stavanger"],
        "Switzerland": ["Zurich", "Geneva", "Basel", "Lausanne"],
        "Austria": ["Salzburg", "Innsbruck", "Graz"],
        "Ireland": ["Cork", "Galway", "Limerick"],
        "Scotland": ["Edinburgh", "Glasgow", "Aberdeen", "Dundee"],
        "Belgium": ["Antwerp", "Bruges", "Ghent", "Liège"],
        "Pakistan": ["Karachi", "Lahore", "Islamabad", "Peshawar"],
        "Vietnam": ["Ho Chi Minh City", "Da Nang", "Hue"],
        "Thailand": ["Chiang Mai", "Phuket", "Pattaya"],
        "Nigeria": ["Lagos", "Abuja", "Kano", "Ibadan"],
        "Morocco": ["Casablanca", "Marrakesh", "Fez", "Tangier"],
        "Israel": ["Tel Aviv", "Haifa", "Eilat"],
        "Iran": ["Isfahan", "Shiraz", "Tabriz"],
        "Colombia": ["Bogotá", "Medellín", "Cartagena"],
        "Peru": ["Cusco", "Arequipa", "Trujillo"],
        "Ukraine": ["Kyiv", "Odessa", "Kharkiv", "Lviv"],
        "Hungary": ["Debrecen", "Szeged", "Pécs"],
        "Denmark": ["Aarhus", "Odense", "Aalborg"],
        "Finland": ["Tampere", "Turku", "Oulu"],
        "Malaysia": ["Kuala Lumpur", "Penang", "Malacca"],
        "Chile": ["Valparaíso", "Concepción", "Antofagasta"],
    }),
    "us_state": (["{} is a city in the state of", "{} is located in the US state of",
                  "The city of {} is in the state of"], {
        "California": ["Los Angeles", "San Diego", "San Jose", "Sacramento", "Oakland", "Fresno"],
        "Texas": ["Houston", "Dallas", "Austin", "San Antonio", "El Paso", "Fort Worth"],
        "Florida": ["Miami", "Orlando", "Tampa", "Jacksonville", "Tallahassee"],
        "Illinois": ["Chicago", "Peoria", "Naperville"],
        "Ohio": ["Cleveland", "Columbus", "Cincinnati", "Dayton"],
        "Pennsylvania": ["Philadelphia", "Pittsburgh", "Harrisburg"],
        "Michigan": ["Detroit", "Ann Arbor", "Grand Rapids", "Lansing"],
        "Georgia": ["Atlanta", "Savannah", "Augusta"],
        "Arizona": ["Phoenix", "Tucson", "Scottsdale"],
        "Colorado": ["Denver", "Boulder", "Aspen"],
        "Nevada": ["Las Vegas", "Reno", "Carson City"],
        "Tennessee": ["Nashville", "Memphis", "Knoxville"],
        "Louisiana": ["New Orleans", "Baton Rouge", "Shreveport"],
        "Minnesota": ["Minneapolis", "Saint Paul", "Duluth"],
        "Utah": ["Salt Lake City", "Provo", "Ogden"],
        "Wisconsin": ["Milwaukee", "Green Bay", "Madison"],
        "Hawaii": ["Honolulu", "Hilo"],
        "Alaska": ["Anchorage", "Juneau", "Fairbanks"],
        "Indiana": ["Indianapolis", "Fort Wayne", "South Bend"],
        "Maryland": ["Baltimore", "Annapolis"],
        "Kentucky": ["Louisville", "Lexington"],
        "Virginia": ["Richmond", "Norfolk", "Virginia Beach"],
        "Connecticut": ["Hartford", "New Haven", "Stamford"],
        "Alabama": ["Montgomery", "Huntsville", "Mobile"],
        "Missouri": ["St. Louis", "Kansas City", "Springfield"],
        "Massachusetts": ["Boston", "Lowell", "Worcester"],
    }),
    "continent": (FACTS["continent"][0], {
        "Europe": ["Belgium", "Ireland", "Denmark", "Finland", "Hungary", "Romania", "Switzerland", "Ukraine",
                   "Croatia", "Greece"],
        "Asia": ["Pakistan", "Bangladesh", "South Korea", "Malaysia", "Cambodia", "Laos", "Kazakhstan",
                 "Afghanistan", "the Philippines"],
        "Africa": ["Egypt", "Algeria", "Tunisia", "Cameroon", "Zambia", "Zimbabwe", "Angola", "Mali", "Somalia",
                   "Sudan", "Rwanda", "Botswana"],
        "South America": ["Ecuador", "Uruguay", "Paraguay", "Guyana", "Suriname"],
        "North America": ["Canada", "Mexico", "Cuba", "Guatemala", "Honduras", "Panama", "Costa Rica", "Jamaica"],
    }),
    "language": (FACTS["language"][0], {
        "Spanish": ["Argentina", "Ecuador", "Bolivia", "Uruguay", "Paraguay", "Guatemala", "Honduras",
                    "Costa Rica", "Panama", "Nicaragua"],
        "Arabic": ["Morocco", "Algeria", "Tunisia", "Libya", "Lebanon", "Kuwait", "Qatar", "Oman", "Yemen"],
        "French": ["Monaco", "Ivory Coast", "Mali", "Cameroon"],
        "English": ["Australia", "New Zealand", "Jamaica", "the United States", "the United Kingdom"],
        "Chinese": ["China", "Taiwan", "Singapore"],
        "Swahili": ["Kenya", "Tanzania", "Uganda"],
        "Portuguese": ["Cape Verde", "Guinea-Bissau"],
        "German": ["Liechtenstein", "Switzerland"],
    }),
    "currency": (FACTS["currency"][0], {
        "euro": ["Belgium", "the Netherlands", "Finland", "Slovakia", "Slovenia", "Estonia", "Latvia",
                 "Lithuania", "Luxembourg", "Malta", "Cyprus", "Croatia"],
        "dollar": ["Singapore", "Jamaica", "Hong Kong", "Taiwan"],
        "peso": ["Cuba", "the Philippines", "Uruguay", "the Dominican Republic"],
        "dinar": ["Iraq", "Jordan", "Kuwait", "Serbia", "Algeria", "Tunisia", "Libya"],
        "shilling": ["Kenya", "Uganda", "Tanzania", "Somalia"],
        "riyal": ["Saudi Arabia", "Qatar", "Oman"],
        "krona": ["Sweden", "Iceland"],
        "pound": ["Egypt", "Lebanon", "Syria"],
    }),
    "company_country": (FACTS["company_country"][0], {
        "Japan": ["Yamaha", "Suzuki", "Toshiba", "Fujifilm", "Subaru", "Mazda", "Casio"],
        "Germany": ["Audi", "Mercedes-Benz", "SAP", "Bayer", "BASF", "Puma", "Deutsche Bank"],
        "Italy": ["Versace", "Armani", "Pirelli", "Maserati", "Benetton", "Ducati"],
        "France": ["Citroën", "L'Oréal", "Danone", "Hermès", "Dior", "Bugatti"],
        "Sweden": ["H&M", "Saab", "Electrolux", "Scania"],
        "South Korea": ["LG", "SK Telecom", "Daewoo"],
        "Switzerland": ["Swatch", "Novartis", "Roche", "Lindt", "Omega"],
        "China": ["Tencent", "Xiaomi", "BYD", "Baidu"],
        "Denmark": ["Lego", "Carlsberg", "Maersk", "Pandora"],
        "Taiwan": ["Acer", "Asus", "Foxconn"],
        "Canada": ["BlackBerry", "Bombardier", "Tim Hortons"],
    }),
    "product_company": (FACTS["product_company"][0], {
        "Microsoft": ["Microsoft Word", "Excel", "PowerPoint", "Outlook", "Skype"],
        "Apple": ["the Apple Watch", "Siri", "the iMac"],
        "Google": ["YouTube", "Google Maps", "the Pixel phone"],
        "Adobe": ["Photoshop", "Acrobat", "Illustrator"],
        "Boeing": ["the 747", "the 737", "the Dreamliner"],
        "Volkswagen": ["the Beetle", "the Golf", "the Passat"],
        "Tesla": ["the Model S", "the Model 3", "the Cybertruck"],
        "Samsung": ["the Galaxy phone", "the Galaxy Tab"],
    }),
    "athlete_sport": (FACTS["athlete_sport"][0], {
        "basketball": ["Larry Bird", "Kevin Durant", "Tim Duncan", "Dirk Nowitzki", "Kareem Abdul-Jabbar"],
        "tennis": ["Pete Sampras", "Maria Sharapova", "Venus Williams", "Andy Murray", "Steffi Graf",
                   "Björn Borg"],
        "golf": ["Rory McIlroy", "Gary Player", "Ernie Els"],
        "soccer": ["Zinedine Zidane", "Kylian Mbappé", "Neymar", "Ronaldinho", "Johan Cruyff", "Thierry Henry",
                   "Wayne Rooney"],
        "baseball": ["Mickey Mantle", "Joe DiMaggio", "Hank Aaron", "Jackie Robinson"],
        "hockey": ["Mario Lemieux", "Bobby Orr", "Alexander Ovechkin"],
        "cricket": ["Don Bradman", "Brian Lara", "Shane Warne"],
    }),
    "instrument": (FACTS["instrument"][0], {
        "guitar": ["Keith Richards", "Eddie Van Halen", "Slash", "Chuck Berry"],
        "piano": ["Elton John", "Ray Charles", "Vladimir Horowitz", "Arthur Rubinstein"],
        "trumpet": ["Chet Baker", "Wynton Marsalis"],
        "saxophone": ["Sonny Rollins", "Kenny G"],
        "drums": ["Ringo Starr", "John Bonham", "Neil Peart", "Keith Moon"],
        "cello": ["Yo-Yo Ma", "Pablo Casals", "Jacqueline du Pré"],
    }),
    "occupation": (["{} worked as a", "By profession, {} was a", "{} is best known as a"], {
        "painter": ["Pablo Picasso", "Claude Monet", "Salvador Dalí", "Leonardo da Vinci", "Henri Matisse",
                    "Paul Cézanne"],
        "physicist": ["Albert Einstein", "Isaac Newton", "Niels Bohr", "Max Planck", "Richard Feynman"],
        "composer": ["Wolfgang Amadeus Mozart", "Ludwig van Beethoven", "Johann Sebastian Bach",
                     "Pyotr Tchaikovsky", "Antonio Vivaldi"],
        "philosopher": ["Plato", "Aristotle", "Immanuel Kant", "Socrates", "René Descartes"],
        "poet": ["Homer", "Walt Whitman", "Emily Dickinson", "John Keats", "Lord Byron"],
        "novelist": ["Charles Dickens", "Jane Austen", "Ernest Hemingway", "Mark Twain"],
    }),
    "animal_class": (["The {} is a kind of", "Biologically, the {} is a", "Zoologists classify the {} as a"], {
        "mammal": ["dolphin", "whale", "bat", "elephant", "tiger", "horse", "kangaroo"],
        "bird": ["eagle", "penguin", "parrot", "owl", "sparrow", "ostrich", "flamingo"],
        "reptile": ["snake", "lizard", "crocodile", "turtle", "iguana"],
        "fish": ["salmon", "tuna", "shark", "trout", "cod"],
        "insect": ["ant", "bee", "butterfly", "beetle", "mosquito"],
        "amphibian": ["frog", "toad", "salamander", "newt"],
    }),
    "dish_country": (["{} is a dish that comes from", "The dish {} originated in", "{} is a traditional food of"], {
        "Italy": ["Pizza", "Lasagna", "Risotto", "Tiramisu", "Carbonara"],
        "Japan": ["Sushi", "Ramen", "Tempura", "Sashimi", "Miso soup"],
        "Mexico": ["Tacos", "Burritos", "Enchiladas", "Guacamole", "Quesadillas"],
        "India": ["Biryani", "Naan", "Samosas", "Tandoori chicken", "Dal"],
        "France": ["Croissants", "Crêpes", "Ratatouille", "Escargot", "Bouillabaisse"],
        "Spain": ["Paella", "Tapas", "Gazpacho", "Churros"],
        "Greece": ["Moussaka", "Souvlaki", "Tzatziki", "Gyros"],
        "China": ["Dim sum", "Peking duck", "Chow mein", "Kung pao chicken"],
        "Germany": ["Bratwurst", "Sauerkraut", "Pretzels"],
        "Korea": ["Kimchi", "Bibimbap", "Bulgogi"],
    }),
}


def facts_large_table() -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """FACTS with FACTS_MORE merged in: the same relations, more subjects, and new relations."""
    out = {rel: (tpls, {t: list(s) for t, s in table.items()}) for rel, (tpls, table) in FACTS.items()}
    for rel, (tpls, table) in FACTS_MORE.items():
        merged = out.setdefault(rel, (tpls, {}))[1]
        for target, subjects in table.items():
            merged.setdefault(target, []).extend(s for s in subjects if s not in merged.get(target, []))
    return out


def _fill(tpl: str, subject: str) -> str:
    """Subjects are written mid-sentence ("the Eiffel Tower"); capitalise the article at the start."""
    if tpl.startswith("{}") and subject.startswith("the "):
        subject = "The " + subject[4:]
    return tpl.format(subject)


def build_fact_candidates(tok, rng: random.Random, table_of=None) -> list[dict]:
    """Every (relation, subject, target) with its paraphrases and a provisional counterfactual target from
    the same relation (first token differs; replaced in finish_facts). Neighbourhoods come after filtering.
    meta["subject"] is the subject as it appears in every prompt (without a leading article)."""
    first = lambda s: tok(" " + s, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    out = []
    for rel, (tpls, table) in (table_of or FACTS).items():
        targets = list(table)
        for target, subjects in table.items():
            for subj in subjects:
                others = [t for t in targets if first(t) != first(target)]
                cf = rng.choice(others)
                out.append(dict(
                    prompt=_fill(tpls[0], subj), answer=" " + target, wrong=" " + cf, corrupted=None,
                    meta=dict(subject=subj[4:] if subj.startswith("the ") else subj, relation=rel, target_true=target, target_new=cf,
                              paraphrases=[_fill(t, subj) for t in tpls[1:]], neighborhood=[])))
    return out


def fact_subjects() -> dict[str, str]:
    """{subject: split}: every subject of FACTS (as in meta, without a leading article), partitioned 2:1:2
    with one stratum per relation (a subject of several relations counts in the first)."""
    return partition(_strata(FACTS), "facts")


def _strata(table_of) -> list[list[str]]:
    """One list of subjects (as in meta, without a leading article) per relation."""
    strip = lambda s: s[4:] if s.startswith("the ") else s  # noqa: E731
    return [[strip(s) for subjects in table.values() for s in subjects] for _, table in table_of.values()]


def facts_large_subjects() -> dict[str, str]:
    """{subject: split} for facts_large: FACTS's subjects keep their `facts` split (so a subject is never in
    two splits across the two suites); the new ones are partitioned 2:1:2 per relation in the same way."""
    old = fact_subjects()
    new = partition([[x for x in st if x not in old] for st in _strata(facts_large_table())], "facts_large")
    return {**new, **old}


def finish_facts(kept: list[dict], candidates: list[dict], tok, rng: random.Random, n_neigh: int = 3,
                 split_of: dict[str, str] | None = None, corrupted: bool = True):
    """Neighbourhood prompts (other subjects, same true target; kept facts first) and a corrupted prompt:
    the prompt of another kept fact of the same relation, with another target (another first token) and the
    same token length; that target becomes the counterfactual one (`wrong`), so the corrupted prompt's true
    answer is the clean prompt's wrong one. Facts with fewer than 2 neighbours or no partner are dropped.
    With `split_of` ({subject: split}), a partner from another split than the fact's is re-drawn from the kept
    facts of the fact's split (a second generator, so the other facts keep theirs); with none there, the fact
    is dropped. corrupted=False (facts_large, made for editing): no partner; `wrong` stays the counterfactual
    target drawn from the same relation."""
    n_tok = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    final = []
    for f in kept:
        m = f["meta"]
        same = lambda pool: [g["prompt"] for g in pool  # noqa: E731
                             if g["meta"]["target_true"] == m["target_true"] and g["meta"]["subject"] != m["subject"]]
        kept_n = same(kept)
        rest = [p for p in same(candidates) if p not in kept_n]
        neigh = rng.sample(kept_n, min(n_neigh, len(kept_n)))
        neigh += rng.sample(rest, min(n_neigh - len(neigh), len(rest)))
        if len(neigh) < 2:
            continue
        m["neighborhood"] = neigh
        final.append(f)
    if not corrupted:
        return final

    first = lambda s: tok(" " + s, add_special_tokens=False)["input_ids"][0]  # noqa: E731

    def partners(f, pool):
        m = f["meta"]
        return [g for g in pool if g["meta"]["relation"] == m["relation"]
                and first(g["meta"]["target_true"]) != first(m["target_true"])
                and n_tok(g["prompt"]) == n_tok(f["prompt"])]

    while True:     # dropping a fact can leave another without a partner
        still = [f for f in final if partners(f, final)]
        if len(still) == len(final):
            break
        final = still
    repick = random.Random(f"{SEED}:facts-partners")
    out = []
    for f in final:     # the counterfactual target is the partner's true target, as in a flipped IOI pair
        g = rng.choice(partners(f, final))
        if split_of is not None and split_of[g["meta"]["subject"]] != split_of[f["meta"]["subject"]]:
            same = [h for h in partners(f, kept) if split_of[h["meta"]["subject"]] == split_of[f["meta"]["subject"]]]
            if not same:
                continue
            g = repick.choice(same)
        f["corrupted"], f["wrong"] = g["prompt"], " " + g["meta"]["target_true"]
        f["meta"].update(target_new=g["meta"]["target_true"], corrupted_subject=g["meta"]["subject"])
        out.append(f)
    return out


# ---------------------------------------------------------------------------------------------
# Greater-than (years) and small-number arithmetic
# ---------------------------------------------------------------------------------------------

EVENTS = ["war", "expedition", "reign", "drought", "construction", "siege", "famine", "strike", "voyage",
     "occupation", "rebellion", "crisis", "dynasty", "project", "trial"]
DIGITS = [str(d) for d in range(10)]
SHOTS = [(1, 1), (3, 2), (2, 4), (4, 3), (1, 6), (5, 2), (2, 2), (6, 1)]


def greater_than_entities() -> dict[str, str]:
    """{entity: split} for the event nouns and the sums "a + b" (a start year takes the split of the event it
    is first drawn with: build_greater_than re-draws a year another split already has, and `label` adds it)."""
    sums = [f"{a} + {b}" for a in range(1, 9) for b in range(1, 9) if a + b <= 9]
    return partition([EVENTS, sums], "greater_than")


def build_greater_than(rng: random.Random, n_years: int = 240, split_of: dict[str, str] | None = None) -> list[dict]:
    """Years: "The war lasted from the year 1732 to the year 173" -> a last digit > 2 (SmolLM2 tokenizes
    digits one by one, so the decade is given and the comparison is on the last digit; the start digit
    is 1..8). Corrupted: the start's last digit set to 0 (as Hanna et al.'s "01" start year).
    Arithmetic: 3 solved examples then "a + b = " -> the digit a+b (sums <= 9); corrupted: one operand
    changed (sum still one digit, so the answer changes). With `split_of` ({event or sum: split}), a start
    year already drawn for an event of another split, or a corrupted sum from another split than the clean
    one, is re-drawn (a second generator, so the other rows keep theirs), so no year or sum is in two splits."""
    repick = random.Random(f"{SEED}:greater_than-repick")
    out = []
    year_split: dict[str, str] = {}
    for _ in range(n_years):
        century, decade, s = rng.randint(11, 19), rng.randint(0, 9), rng.randint(1, 8)
        ev = rng.choice(EVENTS)
        while split_of is not None and year_split.setdefault(f"{century}{decade}{s}", split_of[ev]) != split_of[ev]:
            century, decade, s = repick.randint(11, 19), repick.randint(0, 9), repick.randint(1, 8)
        stem = f"The {ev} lasted from the year {century}{decade}"
        prompt = f"{stem}{s} to the year {century}{decade}"
        out.append(dict(
            prompt=prompt, answer=str(s + 1), wrong=str(s), corrupted=f"{stem}0 to the year {century}{decade}",
            meta=dict(kind="year", event=ev, start=int(f"{century}{decade}{s}"), start_digit=s,
                      answers=DIGITS[s + 1:], wrongs=DIGITS[:s + 1],
                      metric_note="prob_diff: p(next digit > start digit) - p(next digit <= start digit); "
                                  "answer/wrong are the next and the same year (for logit_diff)")))
    pairs = [(a, b) for a in range(1, 9) for b in range(1, 9) if a + b <= 9]
    for a, b in pairs:
        for _ in range(2):
            shots = rng.sample([p for p in SHOTS if p != (a, b)], 3)
            pre = "".join(f"{x} + {y} = {x + y}\n" for x, y in shots)
            # corrupted: one operand changed, the sum still one digit (so the answer changes)
            options = [(a, c) for c in range(1, 10 - a) if c != b] + [(c, b) for c in range(1, 10 - b) if c != a]
            a2, b2 = rng.choice(options)
            if split_of is not None and split_of[f"{a2} + {b2}"] != split_of[f"{a} + {b}"]:
                same = [(x, y) for x, y in options if split_of[f"{x} + {y}"] == split_of[f"{a} + {b}"]]
                a2, b2 = repick.choice(same) if same else (a2, b2)
            total = a + b
            wrong = total + 1 if total < 9 else total - 1
            out.append(dict(
                prompt=f"{pre}{a} + {b} = ", answer=str(total), wrong=str(wrong), corrupted=f"{pre}{a2} + {b2} = ",
                meta=dict(kind="arithmetic", a=a, b=b, corrupted_a=a2, corrupted_b=b2, problem=f"{a} + {b}",
                          corrupted_problem=f"{a2} + {b2}", answers=[str(total)],
                          wrongs=[d for d in DIGITS if d != str(total)],
                          metric_note="prob_diff: p(sum) - p(any other digit); wrong = off by one")))
    return out


# ---------------------------------------------------------------------------------------------
# Gender (profession -> pronoun bias)
# ---------------------------------------------------------------------------------------------

# Majority gender of US workers in the occupation (BLS-style stereotype, as in WinoBias).
PROFESSIONS = {
    "female": ["nurse", "secretary", "receptionist", "librarian", "housekeeper", "nanny", "cashier", "dancer",
               "florist", "midwife", "maid", "teacher", "stylist", "dietitian", "counselor", "bookkeeper",
               "therapist", "assistant", "cleaner", "typist", "beautician", "hygienist", "nutritionist"],
    "male": ["engineer", "mechanic", "carpenter", "plumber", "electrician", "firefighter", "pilot", "surgeon",
             "soldier", "farmer", "programmer", "architect", "janitor", "sheriff", "guard", "driver",
             "butcher", "chef", "CEO", "physicist", "mathematician", "laborer", "welder", "contractor"],
}
GENDER_TEMPLATES = ["The {p} said that", "The {p} was late because", "The {p} finished the work and then"]


def gender_professions(tok) -> dict[str, str]:
    """{profession: split}, partitioned 2:1:2 within each (stereotype, token length) stratum, so every split
    has same-length professions of both stereotypes for the corrupted prompts."""
    n_tok = lambda p: len(tok(" " + p, add_special_tokens=False)["input_ids"])  # noqa: E731
    lengths = sorted({n_tok(p) for ps in PROFESSIONS.values() for p in ps})
    return partition([[p for p in ps if n_tok(p) == n] for ps in PROFESSIONS.values() for n in lengths], "gender")


def build_gender(tok, rng: random.Random, split_of: dict[str, str] | None = None) -> list[dict]:
    """Answer = the stereotyped pronoun, wrong = the other, so logit_diff > 0 means the model follows the
    stereotype. Corrupted: the same template with a profession of the other stereotype and the same
    token length. With `split_of`, a corrupted profession from another split than the clean one is re-drawn
    from the clean one's split (a second generator, so the other rows keep theirs; none there: row left out)."""
    n_tok = lambda p: len(tok(" " + p, add_special_tokens=False)["input_ids"])  # noqa: E731
    repick = random.Random(f"{SEED}:gender-corrupted")
    out = []
    for ti, tpl in enumerate(GENDER_TEMPLATES):
        for g, profs in PROFESSIONS.items():
            other = PROFESSIONS["male" if g == "female" else "female"]
            for p in profs:
                partners = [q for q in other if n_tok(q) == n_tok(p)]
                if not partners:    # no same-length profession of the other stereotype: leave it out
                    continue
                q = rng.choice(partners)
                if split_of is not None and split_of[q] != split_of[p]:
                    same = [x for x in partners if split_of[x] == split_of[p]]
                    if not same:
                        continue
                    q = repick.choice(same)
                he_she = (" she", " he") if g == "female" else (" he", " she")
                out.append(dict(prompt=tpl.format(p=p), answer=he_she[0], wrong=he_she[1],
                                corrupted=tpl.format(p=q),
                                meta=dict(profession=p, stereotype=g, template=ti, corrupted_profession=q,
                                          sign_he_minus_she=1 if g == "male" else -1,
                                          metric_note="logit_diff = stereotyped minus other pronoun; "
                                                      "times sign_he_minus_she gives logit(he) - logit(she)")))
    return out


# ---------------------------------------------------------------------------------------------
# Sentiment
# ---------------------------------------------------------------------------------------------

# (positive, negative) words swapped between the clean and corrupted prompt; same token length enforced.
SENT_VERBS = [("loved", "hated"), ("enjoyed", "disliked"), ("adored", "despised"), ("liked", "hated")]
SENT_ADJ = [("wonderful", "horrible"), ("superb", "awful"), ("excellent", "dreadful"), ("delightful", "dreadful"),
            ("fantastic", "boring"), ("brilliant", "poor"), ("lovely", "ugly"), ("perfect", "bad"),
            ("amazing", "awful"), ("charming", "dull")]
SENT_ITEMS = [("movie", "acting"), ("film", "story"), ("book", "writing"), ("restaurant", "food"),
              ("hotel", "room"), ("album", "music"), ("show", "cast"), ("game", "gameplay"), ("cafe", "coffee"),
              ("concert", "band")]
SENT_TEMPLATES = [
    "I {v} this {item}. The {aspect} was {adj}. Overall, the {item} was",
    "We {v} the {item}: the {aspect} was {adj} from start to finish. In short, it was",
    "Honestly, I {v} the {item} and the {aspect} was {adj}. My verdict: the {item} was",
]
SENT_ANSWERS = [(" great", " terrible"), (" good", " bad"), (" excellent", " awful")]


def sentiment_items() -> dict[str, str]:
    """{item: split}, 2:1:2 over the items ("movie" and "film" together: the same thing)."""
    return partition([[("movie", "film")] + [i for i, _ in SENT_ITEMS if i not in ("movie", "film")]], "sentiment")


def build_sentiment(tok, rng: random.Random, n: int = 240) -> list[dict]:
    """Clean: a positive review; corrupted: the same words with the sentiment words swapped for negative
    ones of the same token length. Answer " great"-like, wrong " terrible"-like (three pairs; the answer
    pair's words never appear in the prompt)."""
    n_tok = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    out, seen = [], set()
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        ti = rng.randrange(len(SENT_TEMPLATES))
        v, a = rng.choice(SENT_VERBS), rng.choice(SENT_ADJ)
        item, aspect = rng.choice(SENT_ITEMS)
        ans = rng.choice(SENT_ANSWERS)
        if {a[0], a[1]} & {ans[0].strip(), ans[1].strip()}:
            continue
        pos = SENT_TEMPLATES[ti].format(v=v[0], adj=a[0], item=item, aspect=aspect)
        neg = SENT_TEMPLATES[ti].format(v=v[1], adj=a[1], item=item, aspect=aspect)
        if pos in seen or n_tok(pos) != n_tok(neg):
            continue
        seen.add(pos)
        out.append(dict(prompt=pos, answer=ans[0], wrong=ans[1], corrupted=neg,
                        meta=dict(template=ti, item=item, words_pos=[v[0], a[0]], words_neg=[v[1], a[1]],
                                  metric_note="logit_diff positive minus negative word; the corrupted "
                                              "(negative) prompt should make it negative")))
    return out


# ---------------------------------------------------------------------------------------------
# In-context label learning with arbitrary labels
# ---------------------------------------------------------------------------------------------

ICL_POS = ("a wonderful day|a lovely gift|a great movie|a delicious meal|a beautiful song|a fantastic trip|"
           "an excellent book|a brilliant idea|a happy ending|a charming town|a perfect evening|a kind friend|"
           "a warm welcome|a sunny morning|a fun party|a sweet puppy").split("|")
ICL_NEG = ("a horrible mess|a terrible meal|an awful smell|a boring movie|a rude waiter|a painful injury|"
           "a dirty room|a sad ending|a broken promise|a nasty cold|a bad dream|an ugly fight|"
           "a cruel joke|a rainy funeral|a long delay|a stolen wallet").split("|")
ICL_FORMAT = "Input: {x}\nOutput:{y}\n\n"


def icl_queries() -> dict[str, str]:
    """{query phrase: split}, 2:1:2 within the positive and within the negative phrases."""
    return partition([ICL_POS, ICL_NEG], "icl_labels")


def build_icl(rng: random.Random, n: int = 200, shots: int = 8) -> list[dict]:
    """Balanced shots in random order, positive -> one label, negative -> the other (which of foo/bar is
    "positive" alternates by example). Corrupted: the same prompt with the label mapping swapped in the
    demonstrations, so the right answer flips; the query is never one of the demonstrations."""
    out = []
    for i in range(n):
        labels = (" foo", " bar") if i % 2 == 0 else (" bar", " foo")   # labels[0] = positive
        items = [(x, 0) for x in rng.sample(ICL_POS, shots // 2)] + [(x, 1) for x in rng.sample(ICL_NEG, shots // 2)]
        rng.shuffle(items)
        q = i // 2 % 2
        used = {x for x, _ in items}
        qx = rng.choice([x for x in (ICL_POS, ICL_NEG)[q] if x not in used])
        tail = ICL_FORMAT.split("{y}")[0].format(x=qx)
        clean = "".join(ICL_FORMAT.format(x=x, y=labels[y]) for x, y in items) + tail
        corr = "".join(ICL_FORMAT.format(x=x, y=labels[1 - y]) for x, y in items) + tail
        out.append(dict(prompt=clean, answer=labels[q], wrong=labels[1 - q], corrupted=corr,
                        meta=dict(query=qx, query_sentiment=("positive", "negative")[q],
                                  positive_label=labels[0].strip(), shots=shots,
                                  corruption="label mapping swapped in the demonstrations")))
    return out


# ---------------------------------------------------------------------------------------------
# Running the model
# ---------------------------------------------------------------------------------------------

def last_logits(model, prompts: list[str], batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        out.append(model.run(prompts[i:i + batch]).logits[:, -1].float())
    return torch.cat(out)


def _ids(tok, words):
    return torch.tensor([tok(w, add_special_tokens=False)["input_ids"][0] for w in words])


def score(model, rows: list[dict], key: str = "prompt"):
    """(logit_diff, top1 == answer) per row for prompts under `key`."""
    tok = model.tokenizer
    logits = last_logits(model, [r[key] for r in rows])
    a, w = _ids(tok, [r["answer"] for r in rows]), _ids(tok, [r["wrong"] for r in rows])
    r = torch.arange(len(rows))
    return logits[r, a] - logits[r, w], logits.argmax(-1) == a, logits


def check_lengths(tok, rows: list[dict], suite: str) -> None:
    for i, r in enumerate(rows):
        if r.get("corrupted") is not None:
            a, b = len(tok(r["prompt"])["input_ids"]), len(tok(r["corrupted"])["input_ids"])
            assert a == b, f"{suite} row {i}: {a} vs {b} tokens: {r['prompt']!r} / {r['corrupted']!r}"


def write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r.get(k) for k in ("prompt", "answer", "wrong", "corrupted", "split", "meta")},
                               ensure_ascii=False) + "\n")


def finish(rows: list[dict], suite: str, split_of: dict[str, str], stats: dict, grow: bool = False) -> list[dict]:
    """Label the rows' splits (`label`), check the splits are entity-disjoint, and add their sizes to stats."""
    from mechanic.tasks.splits import check_disjoint
    from mechanic.tasks.task import Example, Task

    rows = label(rows, suite, split_of, grow)
    task = Task(suite, [Example(r["prompt"], r["answer"], meta=r["meta"], split=r["split"]) for r in rows])
    stats[f"{suite}/splits"] = check_disjoint(task)
    return rows


def sizes_table() -> str:
    """Rows and distinct entities per split of every shipped suite and of the refusal instruction sets."""
    from mechanic.tasks.builtin import list_tasks, load_task
    from mechanic.tasks.splits import ENTITIES, check_disjoint
    from mechanic.tasks.task import Example, Task

    lines = ["| suite | entities | train | validation | test |", "|---|---|---|---|---|"]
    cell = lambda d: f"{d['rows']} rows / {d['entities']} entities"  # noqa: E731
    for name in list_tasks():
        sizes = check_disjoint(load_task(name))
        lines.append(f"| `{name}` | {', '.join(ENTITIES[name])} | " + " | ".join(cell(sizes[s]) for s in SPLITS) + " |")
    for kind in ("harmful", "harmless"):
        text = (PACKAGE / "data" / "safety" / f"{kind}.jsonl").read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        sizes = check_disjoint(Task("refusal", [Example(r["prompt"], "-", split=r["split"]) for r in rows]))
        lines.append(f"| refusal `{kind}` | instruction | " + " | ".join(cell(sizes[s]) for s in SPLITS) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import mechanic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", type=Path, default=SUITES_DIR)
    ap.add_argument("--only", default="ioi,facts,greater_than,gender,sentiment,icl_labels")
    ap.add_argument("--sizes", action="store_true", help="print the split sizes of the shipped suites (a "
                    "markdown table, as in docs/TASKS.md) and exit; needs no model")
    args = ap.parse_args(argv)
    if args.sizes:
        print(sizes_table())
        return
    torch.manual_seed(SEED)
    model = mechanic.load(args.model)
    tok = model.tokenizer
    only = set(args.only.split(","))
    stats = {}

    if "ioi" in only:
        rows = finish(build_ioi(tok, random.Random(SEED)), "ioi", ioi_names(tok), stats)
        check_lengths(tok, rows, "ioi")
        ld, top1, _ = score(model, rows)
        ld_c, _, _ = score(model, rows, "corrupted")
        stats["ioi"] = dict(n=len(rows), acc_logit_diff=float((ld > 0).float().mean()),
                            acc_top1=float(top1.float().mean()), mean_ld=float(ld.mean()),
                            mean_ld_corrupted=float(ld_c.mean()))
        write(rows, args.out / "ioi.jsonl")   # unfiltered: the accuracy is reported, not selected for

    if "facts" in only:
        rng = random.Random(SEED)
        cands = build_fact_candidates(tok, rng)
        ld, top1, logits = score(model, cands)
        kept = [c for c, ok in zip(cands, top1.tolist()) if ok]
        for c in kept:
            c["meta"]["model_check"] = "true target's first token is the top-1 prediction"
        subjects = fact_subjects()
        rows = finish(finish_facts(kept, cands, tok, rng, split_of=subjects), "facts", subjects, stats)
        check_lengths(tok, rows, "facts")
        para = [dict(prompt=p, answer=r["answer"], wrong=r["wrong"]) for r in rows for p in r["meta"]["paraphrases"]]
        pld, _, _ = score(model, para)
        para_ok = float((pld > 0).float().mean())
        stats["facts"] = dict(candidates=len(cands), top1=float(top1.float().mean()),
                              above_cf=float((ld > 0).float().mean()), kept_top1=len(kept), n=len(rows),
                              with_corrupted=rows[0]["corrupted"] is not None if rows else False,
                              paraphrase_above_cf=para_ok)
        write(rows, args.out / "facts.jsonl")

    if "facts_large" in only:
        rng = random.Random(f"{SEED}:facts_large")
        cands = build_fact_candidates(tok, rng, facts_large_table())
        ld, top1, _ = score(model, cands)
        kept = [c for c, ok in zip(cands, top1.tolist()) if ok]
        for c in kept:
            c["meta"]["model_check"] = "true target's first token is the top-1 prediction"
        subjects = facts_large_subjects()
        rows = finish(finish_facts(kept, cands, tok, rng, split_of=subjects, corrupted=False), "facts_large",
                      subjects, stats)
        para = [dict(prompt=p, answer=r["answer"], wrong=r["wrong"]) for r in rows for p in r["meta"]["paraphrases"]]
        pld, _, _ = score(model, para)
        per_rel = {}
        for r in rows:
            per_rel[r["meta"]["relation"]] = per_rel.get(r["meta"]["relation"], 0) + 1
        stats["facts_large"] = dict(candidates=len(cands), top1=float(top1.float().mean()), kept_top1=len(kept),
                                    n=len(rows), paraphrase_above_cf=float((pld > 0).float().mean()),
                                    relations=per_rel)
        write(rows, args.out / "facts_large.jsonl")

    if "greater_than" in only:
        entities = greater_than_entities()
        cands = build_greater_than(random.Random(SEED), split_of=entities)
        check_lengths(tok, cands, "greater_than")
        logits = last_logits(model, [c["prompt"] for c in cands])
        top = logits.argmax(-1).tolist()
        ok = [tok.decode([t]) in c["meta"]["answers"] for c, t in zip(cands, top)]
        rows = finish([c for c, o in zip(cands, ok) if o], "greater_than", entities, stats, grow=True)
        for kind in ("year", "arithmetic"):
            sel = [o for c, o in zip(cands, ok) if c["meta"]["kind"] == kind]
            stats[f"greater_than/{kind}"] = dict(candidates=len(sel), correct=sum(sel),
                                                 rate=sum(sel) / max(1, len(sel)))
        stats["greater_than"] = dict(n=len(rows))
        write(rows, args.out / "greater_than.jsonl")

    if "gender" in only:
        professions = gender_professions(tok)
        rows = finish(build_gender(tok, random.Random(SEED), professions), "gender", professions, stats)
        check_lengths(tok, rows, "gender")
        ld, _, _ = score(model, rows)
        sign = torch.tensor([r["meta"]["sign_he_minus_she"] for r in rows])
        he_she = ld * sign
        fem = torch.tensor([r["meta"]["stereotype"] == "female" for r in rows])
        stats["gender"] = dict(n=len(rows), stereotype_consistent=float((ld > 0).float().mean()),
                               mean_he_minus_she_female=float(he_she[fem].mean()),
                               mean_he_minus_she_male=float(he_she[~fem].mean()))
        write(rows, args.out / "gender.jsonl")

    if "sentiment" in only:
        cands = build_sentiment(tok, random.Random(SEED))
        check_lengths(tok, cands, "sentiment")
        ld, _, _ = score(model, cands)
        ld_c, _, _ = score(model, cands, "corrupted")
        ok = (ld > 0) & (ld_c < 0)
        rows = finish([c for c, o in zip(cands, ok.tolist()) if o], "sentiment", sentiment_items(), stats)
        stats["sentiment"] = dict(candidates=len(cands), clean_right=float((ld > 0).float().mean()),
                                  corrupted_right=float((ld_c < 0).float().mean()),
                                  both_right=float(ok.float().mean()), n=len(rows))
        write(rows, args.out / "sentiment.jsonl")

    if "icl_labels" in only:
        rows = finish(build_icl(random.Random(SEED)), "icl_labels", icl_queries(), stats)
        check_lengths(tok, rows, "icl_labels")
        ld, top1, _ = score(model, rows)
        ld_c, _, _ = score(model, rows, "corrupted")
        stats["icl_labels"] = dict(n=len(rows), acc_logit_diff=float((ld > 0).float().mean()),
                                   acc_top1=float(top1.float().mean()), mean_ld=float(ld.mean()),
                                   corrupted_flipped=float((ld_c < 0).float().mean()))
        write(rows, args.out / "icl_labels.jsonl")

    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
