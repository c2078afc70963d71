"""Regenerate crb's retail product-search demo data: a synthetic catalog and shopper queries for embedding training.

Everything is built from attribute grids and templates with a fixed seed, so a re-run writes the same files:

    python scripts/demo_data/make_retail_search.py

Writes, next to this script:

- retail_search_corpus.jsonl: {"text"} per product of the catalog (title and description, 20-60 words);
- retail_search_train.jsonl and retail_search_eval.jsonl: {"instruction", "query", "positive", "negative"}, where
  query is what a shopper types (paraphrases, use-cases, jargon, the odd typo), positive is the product's catalog
  text and negative a hard negative: a product of the same category that differs in one attribute the query asks for.

Every query pins its product down: no other product of the catalog has all the attributes it asks for. The split is
by product: eval products' queries never appear in train, and some products are only in the corpus.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parents[2] / "crb" / "demo_data"  # where the shipped data files live
SEED = 20240612
INSTRUCTION = "Represent the shopper's search query for retrieving products:"
TRAIN_QUERIES, EVAL_QUERIES = 4, 3  # per product
N_EVAL_PRODUCTS = 85
N_CORPUS_ONLY = 45
TYPO_RATE = 0.1
FILL = 0.5  # share of each category's attribute grid that becomes products
EXTRA_RATE = 0.3
BRAND_RATE = 0.2


@dataclass(frozen=True)
class Value:
    """One value of an attribute: its word in the title ('' for none), a catalog sentence and shopper phrasings.

    A phrasing starting with '+' goes after the product noun ('+for wide feet'), one with '=' replaces the noun
    ('=skillet'), the others go before it ('womens').
    """

    label: str
    desc: str
    asks: tuple[str, ...]


def V(label: str, desc: str, *asks: str) -> Value:
    return Value(label, desc, asks)


@dataclass(frozen=True)
class Category:
    noun: str  # the catalog's noun, in the title
    asks: tuple[str, ...]  # what shoppers call it
    brands: tuple[str, ...]
    price: tuple[int, int]
    blurbs: tuple[str, ...]  # closing sentences, one per product
    dims: dict[str, tuple[Value, ...]]


def colours(*pairs: tuple[str, str]) -> tuple[Value, ...]:
    """Colour values from (catalog name, shopper word) pairs."""
    return tuple(V("", f"Colour: {name}.", word, f"+in {word}") for name, word in pairs)


MEN = V("Men's", "", "mens", "men's", "+for men", "+for my husband", "+for my dad")
WOMEN = V("Women's", "", "womens", "ladies", "women's", "+for my wife", "+for my mum")
KIDS = V("Kids'", "", "kids", "childrens", "+for my son", "+for a child", "+for my daughter")


def cat(noun: str, asks: tuple[str, ...], brands: tuple[str, ...], price: tuple[int, int],
        blurbs: tuple[str, ...], **dims: tuple[Value, ...]) -> Category:
    return Category(noun, asks, brands, price, blurbs, dims)


CATEGORIES = [
    cat("Hiking Boot", ("hiking boots", "walking boots", "trail boots", "trekking boots"),
        ("Ridgeway", "Cairnstep", "Fellgate"), (60, 180),
        ("Grippy lugged sole for loose ground.", "Padded collar for long days out."),
        who=(MEN, WOMEN, KIDS),
        water=(V("Storm", "A sealed DryLock membrane and gusseted tongue keep water out.", "waterproof", "wp",
                 "+for wet trails", "+that keep feet dry in the rain", "+for boggy walks"),
               V("Vent", "Mesh panels let heat escape on warm days.", "breathable", "summer", "+for hot weather",
                 "+that dont make feet sweat")),
        fit=(V("Wide", "Built on a wide last with extra toe room.", "wide fit", "2E", "+for wide feet",
               "+for broad feet", "+with a roomy toe box"),
             V("", "Standard width, true to size.", "regular width", "+in normal width")),
        upper=(V("Leather", "Full-grain leather upper that softens with wear.", "leather", "real leather",
                 "+in leather"),
               V("", "Vegan upper, no animal materials.", "vegan", "non-leather", "+with no leather")),
        colour=colours(("walnut brown", "brown"), ("jet black", "black"), ("slate", "grey"), ("moss", "green")),
    ),
    cat("Running Shoe", ("running shoes", "trainers", "runners", "sneakers for running"),
        ("Pacefold", "Striden", "Kestrel Run"), (50, 170),
        ("Knit upper with a padded heel tab.", "Reflective details for early mornings."),
        who=(MEN, WOMEN),
        surface=(V("Road", "Smooth outsole made for pavement and treadmill miles.", "road", "+for the treadmill",
                   "+for pavement running", "+for city runs"),
                 V("Trail", "Deep lugs grip mud, roots and rocks.", "trail", "+for off-road runs", "+for muddy paths",
                   "+for running in the woods")),
        support=(V("", "Neutral platform.", "neutral", "+for neutral runners", "+for normal arches"),
                 V("Stability", "Firm medial post guides feet that roll inward.", "stability", "+for flat feet",
                   "+for overpronation", "+for overpronators")),
        ride=(V("Cloud", "Thick foam stack cushions every stride.", "max cushion", "plush", "+for long runs",
                "+for marathon training", "+that are easy on the knees"),
              V("Sprint", "Low, firm and light for race-day speed.", "racing", "fast", "+for a 5k race",
                "+for speedwork", "lightweight")),
        colour=colours(("white/silver", "white"), ("black", "black"), ("coral", "pink"), ("cobalt", "blue")),
    ),
    cat("Rain Jacket", ("rain jacket", "raincoat", "waterproof coat", "rain mac", "jacket for rain"),
        ("Northmere", "Driftline", "Harbour & Co"), (40, 200),
        ("Taped seams and storm flap over the zip.", "Two zipped hand pockets."),
        who=(MEN, WOMEN, KIDS),
        warmth=(V("Insulated", "Padded with recycled fill for cold, wet days.", "insulated", "padded", "warm",
                  "+for winter", "+for cold weather"),
                V("Packable", "Light shell that folds into its own pocket.", "packable", "+that packs small",
                  "+for travel", "+to keep in my bag", "lightweight")),
        length=(V("Longline", "Knee-length cut that covers the thighs.", "long", "knee length", "longline",
                  "+that covers my legs"),
                V("", "Hip-length cut.", "short", "hip length", "+that stops at the hip")),
        hood=(V("", "Adjustable peaked hood.", "hooded", "+with a hood"),
              V("", "Stand-up collar, no hood.", "+without a hood", "hoodless", "+with no hood")),
        colour=colours(("navy", "navy"), ("signal red", "red"), ("sunflower", "yellow"), ("black", "black"),
                       ("olive", "khaki")),
    ),
    cat("Backpack", ("backpack", "rucksack", "bag", "pack"), ("Transit Supply", "Larchmont", "Kitebag"), (30, 150),
        ("Padded mesh back panel and chest strap.", "Lifetime warranty on zips and seams."),
        size=(V("18L", "18-litre daypack with a slim profile.", "small", "=daypack", "+for day trips",
                "+for a day hike"),
              V("30L", "30-litre main compartment with organiser pockets.", "medium", "commuter", "+for school",
                "+for work"),
              V("45L", "45-litre capacity, sized to airline cabin limits.", "big", "large", "travel",
                "+for a week away", "carry-on", "+for backpacking")),
        shell=(V("Roll-Top", "Welded roll-top shell stays dry in a downpour.", "waterproof", "=dry bag",
                 "+for cycling in the rain", "+that keeps stuff dry"),
               V("", "Canvas body with a two-way zip.", "canvas", "zip", "+with a zip top")),
        laptop=(V("Laptop", "Padded sleeve fits a 16-inch laptop.", "laptop", "+for my laptop",
                  "+that fits a 16 inch laptop", "+with a laptop sleeve"),
                V("", "No laptop sleeve, one open main pocket.", "+without a laptop sleeve", "+with no laptop pocket")),
        colour=colours(("black", "black"), ("forest", "green"), ("sand", "beige"), ("rust", "orange"),
                       ("grey marl", "grey")),
    ),
    cat("Headphones", ("headphones", "headset", "cans", "earphones"), ("Sonara", "Quietline", "Tunewell"), (20, 350),
        ("Up to 30 hours of playback.", "Carry pouch included."),
        anc=(V("ANC", "Active noise cancelling silences engines and chatter.", "noise cancelling", "anc",
               "+to block out plane noise", "+for a noisy office", "+for the commute"),
             V("", "Passive isolation only.", "+without noise cancelling", "non-anc")),
        link=(V("Wireless", "Bluetooth 5.3 with multipoint pairing.", "wireless", "bluetooth", "bt", "cordless"),
              V("Wired", "Detachable 3.5 mm cable, no charging needed.", "wired", "+with a cable", "+with a jack plug",
                "+that never need charging")),
        sport=(V("Sport", "Sweat-resistant with an IPX5 rating.", "sweatproof", "+for the gym", "+for running",
                 "+for workouts"),
               V("", "Tuned for rich, detailed sound at home.", "+for listening at home", "hifi")),
        form=(V("Over-Ear", "Cushioned cups sit around the ears.", "over ear", "full size", "+that go over the ears"),
              V("In-Ear", "Tiny buds with three sizes of silicone tips.", "=earbuds", "in ear", "=buds",
                "+that go in the ear"),
              V("On-Ear", "Compact pads rest on the ears and fold flat.", "on ear", "compact foldable")),
        colour=colours(("matte black", "black"), ("ivory", "white"), ("midnight blue", "navy")),
    ),
    cat("", ("toy", "gift", "present", "something"), ("Little Orbit", "Puddlejump", "Brickaroo"), (10, 80),
        ("Tested to toy safety standards.", "Comes gift-boxed."),
        age=(V("", "Suited to toddlers aged 1 to 2.", "+for a 1 year old", "+for an 18 month old", "toddler",
               "+for a toddler"),
             V("", "Suited to children aged 3 to 5.", "+for a 4 yr old", "preschool", "+for a 3 year old",
               "+for a 5yo"),
             V("", "Suited to children aged 6 to 8.", "+for a 7 year old", "+for a six year old", "+for an 8yo"),
             V("", "Suited to children aged 9 to 12.", "+for a 10 year old", "tween", "+for an 11yo")),
        theme=(V("Dinosaur", "Features a T. rex, a triceratops and friends.", "dino", "+for a kid who loves dinosaurs",
                 "+for a dinosaur fan", "jurassic"),
               V("Space", "Rockets, planets and a moon-base crew.", "space", "+for a future astronaut",
                 "+for a kid obsessed with rockets"),
               V("Ocean", "Sharks, whales and an octopus.", "sea creatures", "+for a shark fan", "under the sea",
                 "+for a fish mad kid"),
               V("Farm", "A tractor, a barn and farm animals.", "farm", "+for a tractor mad kid",
                 "+for a child who loves cows and sheep"),
               V("Unicorn", "Unicorns, rainbows and a fairy castle.", "unicorn", "+for a unicorn fan", "magical",
                 "rainbow")),
        kind=(V("Building Set", "Chunky interlocking bricks to build and rebuild.", "=building blocks", "construction",
                "+to build", "=bricks"),
              V("Jigsaw", "Thick jigsaw pieces in a sturdy box.", "=jigsaw", "=puzzle", "+with puzzle pieces"),
              V("Plush", "Soft, huggable and machine washable.", "cuddly", "=stuffed animal", "=soft toy",
                "+to cuddle at bedtime"),
              V("Board Game", "A board game for 2 to 4 players.", "=board game", "+to play as a family",
                "=family game")),
    ),
    cat("", ("pan", "pot", "cookware"), ("Hearthwell", "Copperline", "Panora"), (20, 150),
        ("Oven-safe to 220 C.", "Stay-cool riveted handle."),
        size=(V("20 cm", "20 cm across.", "small", "+for one person", "+for cooking for one"),
              V("28 cm", "28 cm across.", "large", "big", "+for a family of four", "family size")),
        metal=(V("Ceramic", "PFAS-free ceramic coating releases food easily.", "nonstick", "non-stick", "pfas free",
                 "+that eggs dont stick to"),
               V("Cast Iron", "Pre-seasoned cast iron that holds heat.", "cast iron", "heavy duty",
                 "+that lasts a lifetime"),
               V("Steel", "Tri-ply stainless steel, dishwasher safe.", "stainless", "steel",
                 "+that goes in the dishwasher")),
        kind=(V("Frying Pan", "A shallow skillet with sloped sides.", "=frying pan", "=skillet", "+for frying eggs"),
              V("Saucepan", "Deep sides and a glass lid.", "=saucepan", "+for sauces and soup", "+with a lid"),
              V("Wok", "Round-bottomed for fast, high-heat stir-fries.", "=wok", "+for stir fry")),
        hob=(V("", "Magnetic base works on induction, gas and electric.", "induction", "+for an induction hob",
               "+for induction"),
             V("", "For gas and electric hobs only.", "+for a gas stove", "+for gas hobs")),
    ),
    cat("Duvet", ("duvet", "comforter", "quilt", "doona"), ("Softnest", "Dreamloft", "Linden & Lark"), (30, 250),
        ("Box-stitched to keep the fill even.", "Cotton cover, 233 thread count."),
        size=(V("Single", "Single size, 135 x 200 cm.", "single", "+for a single bed", "+for a kids bed"),
              V("Double", "Double size, 200 x 200 cm.", "double", "+for a double bed"),
              V("King", "King size, 230 x 220 cm.", "king", "king size", "+for a king bed"),
              V("Super King", "Super king size, 260 x 220 cm.", "super king", "+for an emperor bed", "biggest size")),
        tog=(V("4.5 Tog", "Light 4.5 tog weight for summer.", "summer", "light", "+for hot sleepers",
               "+that wont be too hot"),
             V("10.5 Tog", "Medium 10.5 tog weight for all seasons.", "all season", "medium weight",
               "+for all year round"),
             V("13.5 Tog", "Heavy 13.5 tog weight for winter.", "winter", "thick", "extra warm",
               "+for a cold bedroom")),
        fill=(V("Goose Down", "Filled with soft goose down and feather.", "down", "feather", "goose down"),
              V("Hollowfibre", "Hypoallergenic hollowfibre fill.", "hypoallergenic", "non-feather", "+for allergies",
                "+for asthma sufferers", "synthetic")),
        wash=(V("", "Machine washable at 60 C.", "washable", "+that goes in the washing machine"),
              V("", "Dry clean only.", "dry clean", "+that is dry clean only")),
    ),
    cat("Water Bottle", ("water bottle", "drinks bottle", "flask", "bottle"), ("Hydrova", "Clearpeak", "Sipwell"),
        (8, 45), ("Leak-proof when closed.", "Powder-coated grip."),
        size=(V("500 ml", "Holds 500 ml.", "small", "+that fits a cup holder", "half litre", "17oz"),
              V("750 ml", "Holds 750 ml.", "medium", "+for the gym bag", "25oz"),
              V("1 L", "Holds 1 litre.", "big", "1l", "+for all day hydration", "large")),
        wall=(V("Thermal", "Double-wall vacuum steel keeps drinks cold 24 h or hot 12 h.", "insulated", "=thermos",
                "+that keeps drinks cold all day", "+for hot coffee"),
              V("", "Single-wall BPA-free Tritan, very light.", "plastic", "bpa free", "lightweight",
                "+that is light to carry")),
        lid=(V("Straw", "Flip-up straw lid.", "+with a straw", "straw lid"),
             V("Sport", "One-hand sports cap.", "+with a sports cap", "+with a flip cap"),
             V("", "Wide screw cap that takes ice cubes.", "+with a screw lid", "wide mouth")),
        colour=colours(("mint", "green"), ("stainless", "silver"), ("lilac", "purple"), ("charcoal", "black")),
    ),
    cat("", ("lamp", "light", "lighting"), ("Lumina", "Glowhaus", "Arbor Light"), (20, 180),
        ("Uses about 8 W.", "Two-year warranty."),
        light=(V("", "Warm, dimmable glow.", "dimmable", "warm light", "+for reading in bed", "cosy"),
               V("Daylight", "Bright 6500 K daylight LEDs.", "daylight", "+for crafts", "+for sewing", "bright white",
                 "+for detailed work")),
        power=(V("Cordless", "USB-C rechargeable battery, no cable needed.", "cordless", "rechargeable", "battery",
                 "+without a cable"),
               V("", "Mains powered with an inline switch.", "plug in", "mains", "+with a plug")),
        kind=(V("Desk Lamp", "Weighted base and an adjustable arm.", "=desk lamp", "+for my desk", "=study lamp"),
              V("Floor Lamp", "Stands 160 cm tall on a slim pole.", "=floor lamp", "standing", "=tall lamp",
                "+for the living room corner"),
              V("Clip Lamp", "Sprung clamp grips shelves and headboards.", "clip on", "=clamp light",
                "+that attaches to the bed")),
        finish=(V("", "Brushed brass finish.", "brass", "gold"),
                V("", "Matte black finish.", "black", "+in black"),
                V("", "White powder-coated finish.", "white", "+in white")),
    ),
    cat("Yoga Mat", ("yoga mat", "exercise mat", "workout mat", "mat"), ("Flowform", "Asana Lab", "Groundwork"),
        (15, 120), ("Carry strap included.", "Alignment lines printed on top."),
        thick=(V("3 mm", "3 mm thin and foldable.", "thin", "foldable", "+for travel", "+that fits in a suitcase"),
               V("6 mm", "6 mm standard thickness.", "standard", "6mm"),
               V("10 mm", "10 mm thick cushioning.", "thick", "cushioned", "+for bad knees", "+for pilates")),
        stuff=(V("Rubber", "Natural rubber with a tacky grip.", "grippy", "non slip", "+for hot yoga",
                 "natural rubber"),
               V("TPE", "Latex-free TPE, light and easy to clean.", "latex free", "+for a latex allergy", "tpe"),
               V("Cork", "Cork top that gets grippier with sweat.", "cork", "+that isnt slippery when sweaty")),
        length=(V("XL", "Extra long, 200 cm.", "extra long", "xl", "+for tall people"),
                V("", "Standard 183 cm length.", "normal length", "+in standard length")),
        colour=colours(("sage", "green"), ("plum", "purple"), ("sand", "beige"), ("ink", "dark blue")),
    ),
    cat("Chair", ("office chair", "desk chair", "chair", "computer chair"), ("Postura", "Deskworks", "Seatwell"),
        (80, 450), ("Height adjustable with a gas lift.", "Quiet-rolling castors."),
        load=(V("Heavy Duty", "Steel base rated to 180 kg.", "heavy duty", "+for big and tall", "+for heavier people",
                "bariatric"),
              V("", "Rated to 110 kg.", "+with a standard weight limit")),
        arms=(V("", "4D armrests move up, down, in and out.", "+with adjustable arms", "4d arms"),
              V("Armless", "No armrests, so it tucks under the desk.", "armless", "+without arms",
                "+with no armrests")),
        kind=(V("Mesh Task", "Breathable mesh back with a synchro tilt.", "ergonomic", "mesh", "+for long days wfh",
                "+for back pain"),
              V("Gaming", "Racing-style bucket seat with a neck pillow.", "=gaming chair", "racing style",
                "+for gaming"),
              V("Saddle", "Saddle seat that keeps the hips open.", "saddle", "+for a standing desk",
                "=perching stool")),
        colour=colours(("black", "black"), ("grey", "grey"), ("white", "white"), ("teal", "blue")),
    ),
    cat("Coffee Maker", ("coffee maker", "coffee machine", "coffee thing"), ("Brewster", "Crema Co", "Morning Mill"),
        (25, 600), ("Descaling reminder built in.", "Removable drip tray."),
        kind=(V("Espresso", "15-bar pump for real espresso shots.", "=espresso machine", "+for lattes",
                "+that makes cappuccino", "bean to cup"),
              V("Filter", "Drip brewer with a glass jug.", "filter", "drip", "+for filter coffee"),
              V("Pod", "Takes capsules for one-touch drinks.", "pod", "capsule", "+that takes pods"),
              V("French Press", "Plunger press with a steel mesh filter.", "=cafetiere", "=french press", "plunger")),
        cups=(V("", "Makes 1 to 2 cups at a time.", "single serve", "+for one person", "+for a small kitchen"),
              V("", "Makes up to 10 cups at a time.", "+for the office", "+for a big family", "+for lots of people")),
        extra=(V("", "Steam wand for frothing milk.", "+with a milk frother", "+with a steam wand"),
               V("", "Programmable timer for wake-up brews.", "+with a timer", "+that is ready when i wake up"),
               V("", "No frills, nothing to programme.", "simple", "basic", "+with no extras")),
        colour=colours(("black", "black"), ("cream", "cream"), ("chrome", "silver")),
    ),
    cat("Dog Bed", ("dog bed", "pet bed", "bed for a dog", "dog basket"), ("Pawsome", "Barkley", "Snugpup"), (20, 160),
        ("Non-slip base.", "Filling made from recycled bottles."),
        size=(V("Small", "Small, for dogs up to 10 kg.", "+for a chihuahua", "+for a small dog", "+for a dachshund",
                "small"),
              V("Medium", "Medium, for dogs of 10 to 25 kg.", "+for a spaniel", "+for a beagle", "medium"),
              V("Large", "Large, for dogs over 25 kg.", "+for a labrador", "+for a big dog", "+for a german shepherd",
                "large")),
        kind=(V("Orthopaedic", "Memory foam eases stiff joints.", "orthopedic", "memory foam", "+for an old dog",
                "+for a dog with arthritis"),
              V("Calming Donut", "Raised fluffy rim dogs can curl into.", "calming", "donut", "+for an anxious dog",
                "+for a nervous rescue"),
              V("Raised Cot", "Mesh cot raised off the ground.", "elevated", "raised", "outdoor", "+for hot weather")),
        cover=(V("", "Zip-off cover is machine washable.", "washable", "+with a removable cover",
                 "+that goes in the wash"),
               V("", "Wipe-clean waterproof cover.", "waterproof", "wipe clean", "+for a puppy that has accidents")),
        colour=colours(("charcoal", "grey"), ("caramel", "brown"), ("navy", "blue")),
    ),
    cat("Tent", ("tent", "shelter", "camping tent"), ("Basecamp", "Skyfold", "Wildhaven"), (40, 500),
        ("Groundsheet sewn in.", "Comes with pegs and a carry bag."),
        berths=(V("2-Person", "Sleeps two.", "2 man", "+for two people", "+for a couple"),
                V("4-Person", "Sleeps four, with a porch.", "4 man", "+for a family of 4", "family"),
                V("6-Person", "Sleeps six in two bedrooms.", "6 man", "big", "+for a large group")),
        season=(V("3-Season", "Ventilated for spring to autumn.", "3 season", "summer", "+for festivals"),
                V("4-Season", "Strong poles and snow flaps for winter.", "4 season", "+for winter camping", "+for snow",
                  "+for mountains")),
        pitch=(V("Pop-Up", "Springs open in seconds, no poles to thread.", "pop up", "instant", "+that puts itself up",
                 "+that is easy to pitch"),
               V("", "Colour-coded poles, pitched in about 15 minutes.", "+with poles", "pole")),
        colour=colours(("olive", "green"), ("orange", "orange"), ("grey", "grey")),
    ),
]

OPENERS = ["", "", "", "", "looking for ", "need ", "best ", "cheap ", "good ", "any ", "recommend ", "shopping for "]


@dataclass(frozen=True)
class Product:
    cat: int
    brand: str
    values: tuple[int, ...]  # index of the chosen value per dimension
    price: float
    text: str


def describe(rng: random.Random, cat: Category, brand: str, vals: list[Value], price: float) -> str:
    title = " ".join([brand, *(v.label for v in vals if v.label), cat.noun]).strip()
    text = " ".join([f"{title}.", *(v.desc for v in vals if v.desc), rng.choice(cat.blurbs), f"${price:.2f}."])
    assert 20 <= len(text.split()) <= 60, text
    return text


def build_catalog(rng: random.Random) -> list[Product]:
    products: list[Product] = []
    for ci, cat in enumerate(CATEGORIES):
        grid = list(itertools.product(*(range(len(vs)) for vs in cat.dims.values())))
        for combo in sorted(rng.sample(grid, round(FILL * len(grid)))):
            vals = [vs[i] for vs, i in zip(cat.dims.values(), combo, strict=True)]
            brand = rng.choice(cat.brands)
            price = rng.randint(*cat.price) - 0.01
            products.append(Product(ci, brand, combo, price, describe(rng, cat, brand, vals, price)))
    return products


def matches(products: list[Product], p: Product, dims: list[int]) -> list[Product]:
    """Products of p's category that share p's values on dims."""
    return [q for q in products if q.cat == p.cat and all(q.values[d] == p.values[d] for d in dims)]


def typo(rng: random.Random, text: str) -> str:
    """Swap, drop or double one letter of a longer word."""
    words = text.split()
    idx = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not idx:
        return text
    i = rng.choice(idx)
    w, j = words[i], rng.randrange(1, len(words[i]) - 1)
    words[i] = rng.choice([w[:j] + w[j + 1] + w[j] + w[j + 2:], w[:j] + w[j + 1:], w[:j] + w[j] + w[j:]])
    return " ".join(words)


def make_query(rng: random.Random, products: list[Product], p: Product) -> tuple[str, list[int]]:
    """A shopper query asking for just enough of p's attributes that p is the only product that fits."""
    cat = CATEGORIES[p.cat]
    order = list(range(len(cat.dims)))
    rng.shuffle(order)
    n = next(k for k in range(1, len(order) + 1) if len(matches(products, p, order[:k])) == 1)
    dims = order[:n + (rng.random() < EXTRA_RATE)]  # shoppers often ask for more than they need to
    values = [list(cat.dims.values())[d][p.values[d]] for d in dims]
    pre, post, nouns = [], [], []
    for v in values:
        ask = rng.choice(v.asks)
        {"+": post, "=": nouns}.get(ask[0], pre).append(ask.lstrip("+="))
    rng.shuffle(pre)
    rng.shuffle(post)
    query = " ".join([*pre, *nouns] if nouns else [*pre, rng.choice(cat.asks)])
    if post:
        query += " " + post[0] + "".join(rng.choice([" ", ", ", " and "]) + x for x in post[1:])
    if rng.random() < BRAND_RATE:
        query = f"{p.brand.lower()} {query}"
    if rng.random() < 0.15:
        query += f" under ${int(p.price // 10 + 1) * 10}"
    query = rng.choice(OPENERS) + query
    if rng.random() < TYPO_RATE:
        query = typo(rng, query)
    return query.lower(), dims


def hard_negative(rng: random.Random, pool: list[Product], p: Product, dims: list[int]) -> Product:
    """A product of p's category from pool that matches the query on as many asked-for attributes as can be."""
    same = [q for q in pool if q.cat == p.cat and q is not p]
    best = max(sum(q.values[d] == p.values[d] for d in dims) for q in same)
    return rng.choice([q for q in same if sum(q.values[d] == p.values[d] for d in dims) == best])


def records(rng: random.Random, products: list[Product], chosen: list[Product], k: int,
            negatives: list[Product]) -> list[dict[str, str]]:
    """k distinct queries for each chosen product, each with a hard negative drawn from negatives."""
    out = []
    for p in chosen:
        seen: set[str] = set()
        for _ in range(20 * k):
            query, dims = make_query(rng, products, p)
            if query in seen:
                continue
            seen.add(query)
            neg = hard_negative(rng, negatives, p, dims)
            out.append({"instruction": INSTRUCTION, "query": query, "positive": p.text, "negative": neg.text})
            if len(seen) == k:
                break
    rng.shuffle(out)
    return out


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} records to {path.name}")


def main() -> None:
    rng = random.Random(SEED)
    products = build_catalog(rng)
    assert len({p.text for p in products}) == len(products), "duplicate catalog texts"
    order = products[:]
    rng.shuffle(order)
    eval_products = order[:N_EVAL_PRODUCTS]
    train_products = order[N_EVAL_PRODUCTS + N_CORPUS_ONLY:]
    rest = order[N_EVAL_PRODUCTS:]  # train never sees an eval product, not even as a negative
    write_jsonl(HERE / "retail_search_corpus.jsonl", [{"text": p.text} for p in products])
    write_jsonl(HERE / "retail_search_train.jsonl", records(rng, products, train_products, TRAIN_QUERIES, rest))
    write_jsonl(HERE / "retail_search_eval.jsonl", records(rng, products, eval_products, EVAL_QUERIES, products))


if __name__ == "__main__":
    main()
