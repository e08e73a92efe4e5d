"""Build the example input table examples/data/reviews.parquet.

Deterministic (fixed seed, no clock, no network); needs only the stdlib and
pyarrow.  Run from anywhere:

    python examples/make_reviews.py

English reviews are composed from 1-3 hand-written sentences about concrete
aspects of one product, all of the same sentiment (a positive review may carry
one clearly minor complaint, a negative one a clearly grudging compliment), so
the gold label stays unambiguous.  A handful of German and French reviews are
written out in full so that `WHERE lang = 'en'` filters something.
"""
from __future__ import annotations

import random
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent / "data" / "reviews.parquet"
N_EN = {"positive": 108, "negative": 96, "neutral": 36}  # 240 English rows

# product -> (positive sentences, negative sentences, neutral sentences)
PRODUCTS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "wireless earbuds": ([
        "Sound is way fuller than I expected for earbuds at this price, the bass actually has some punch.",
        "Battery easily gets me through a full workday of calls and music.",
        "They stay put during my morning runs, even when I'm sweating a lot.",
        "Pairing with my phone took about five seconds and they reconnect automatically every time.",
        "The noise cancelling is good enough that I can't hear the train anymore on my commute.",
        "The case is small enough to fit in the coin pocket of my jeans, which I love.",
        "Call quality is clear, my coworkers said I sound better than on my old headset.",
        "Touch controls are responsive and I haven't had a single accidental pause.",
    ], [
        "The left earbud stopped charging after three weeks.",
        "The connection drops every few minutes when my phone is in my back pocket.",
        "They fall out of my ears constantly no matter which tip size I try.",
        "Battery life is nowhere near the advertised eight hours, I get maybe three.",
        "There's a noticeable audio delay when watching videos, which makes them useless for Netflix.",
        "The case lid feels flimsy and already snapped off at the hinge.",
        "The microphone is awful, everyone on calls says I sound like I'm in a tunnel.",
        "Sound is tinny and harsh at anything above half volume.",
    ], [
        "They sound about the same as the cheap pair they replaced.",
        "Battery life is fine, roughly what the listing says.",
        "Fit is okay for me, though I did have to swap to the smaller tips.",
    ]),
    "coffee grinder": ([
        "The grind is really consistent, my pour-overs finally taste balanced instead of bitter.",
        "It's much quieter than my old blade grinder, I can use it without waking the kids.",
        "Switching from fine espresso to coarse French press only takes a couple of clicks.",
        "Very little static, so the grounds don't end up sprayed all over the counter.",
        "The hopper holds enough beans for about a week of morning coffee.",
        "Cleaning is simple, the upper burr pops out without any tools.",
        "It feels solid and heavy, nothing wobbles when it's running.",
        "The timer dial makes it easy to grind the same dose every single morning.",
    ], [
        "The burrs started squealing after a month and now it jams on darker roasts.",
        "The grounds come out with tons of static and cling to everything.",
        "Even on the finest setting it's nowhere near fine enough for espresso.",
        "It's ridiculously loud, like running a leaf blower in my kitchen.",
        "The plastic catch cup cracked within two weeks of normal use.",
        "Grind size is all over the place, I get dust and boulders in the same batch.",
        "The motor overheated and shut off halfway through grinding for a full carafe.",
        "Beans keep getting stuck in the chute and I have to shake it to get them out.",
    ], [
        "It grinds coffee, nothing more and nothing less.",
        "Grind consistency is about average for a grinder in this range.",
        "It's a bit loud but not unusually so for a burr grinder.",
    ]),
    "running shoes": ([
        "Super comfortable right out of the box, no break-in period at all.",
        "I ran a half marathon in them last weekend and didn't get a single blister.",
        "The cushioning is soft without feeling mushy, my knees feel better after long runs.",
        "True to size, I ordered my usual 10 and they fit perfectly.",
        "They're really light, I barely notice them on tempo runs.",
        "Grip on wet pavement is great, I've run through several rainy mornings without slipping.",
        "After 300 miles the sole still looks almost new.",
        "The mesh upper breathes well, my feet don't overheat in summer.",
    ], [
        "The sole started peeling away from the upper after about 80 miles.",
        "They run at least half a size small, my toes were jammed against the front.",
        "The heel rubs so badly that I had blisters on both feet after one run.",
        "Zero arch support, my feet ached for two days after a 5k.",
        "The tread wore down completely in two months.",
        "They squeak on every step on indoor floors, which is embarrassing at the gym.",
        "The insole slides around inside the shoe and bunches up under my toes.",
        "In person the color is a dull gray, nothing like the bright blue in the photos.",
    ], [
        "Decent everyday shoes, nothing special for actual running.",
        "Fit is about what I expected for this brand.",
        "The cushioning is average, neither firm nor especially soft.",
    ]),
    "phone case": ([
        "I've dropped my phone on concrete twice already and there's not a scratch on it.",
        "The buttons are still easy to press, unlike a lot of bulky cases.",
        "The cutouts line up perfectly with the camera and the charging port.",
        "It's slim enough that the phone still fits in my pocket comfortably.",
        "Wireless charging works fine with the case on.",
        "The grip texture on the sides makes the phone much less slippery.",
        "The clear back hasn't yellowed at all after four months.",
        "The raised lip around the screen already saved it from a face-down fall.",
    ], [
        "The clear back turned yellow within a few weeks.",
        "The camera cutout is slightly off and blocks part of the lens in photos.",
        "It's so slippery that my phone slid right off the desk on the first day.",
        "The buttons are stiff and I have to press really hard to change the volume.",
        "The edges started peeling and cracking after a month.",
        "Wireless charging stopped working the moment I put this case on.",
        "It's much bulkier than it looks in the pictures and barely fits in my pocket.",
        "It attracts lint and dust like crazy and looks grimy all the time.",
    ], [
        "It's a plain case that fits the phone as described.",
        "Protection seems okay, though I haven't dropped it yet to find out.",
        "It adds a bit of bulk, about what you'd expect from a case like this.",
    ]),
    "desk lamp": ([
        "The light is bright and even, no more squinting at my notes at night.",
        "Three color temperatures is great, warm light in the evening and cool light for work.",
        "The arm holds its position perfectly wherever I set it.",
        "The USB port on the base is handy for charging my phone.",
        "The touch dimmer is smooth and goes low enough to use as a night light.",
        "No flicker at all, which my eyes really appreciate during long study sessions.",
        "The weighted base means it doesn't tip over even when fully extended.",
        "It looks much more expensive than it was, very clean design.",
    ], [
        "The light flickers noticeably at the lower brightness settings.",
        "The arm slowly droops down over the course of an evening.",
        "It buzzes faintly whenever it's on, which drives me crazy in a quiet room.",
        "The touch button is so sensitive it turns on whenever I bump the desk.",
        "Even at full brightness it's too dim to read by.",
        "The base is too light and the whole thing tips over when you extend the arm.",
        "It died completely after six weeks and won't turn on at all.",
        "The cool white setting is harsh and bluish, like an operating room.",
    ], [
        "It's a basic lamp that gives enough light for a small desk.",
        "Brightness is fine, roughly like any other LED lamp I've had.",
        "The design is simple and it fits in without standing out.",
    ]),
    "backpack": ([
        "My 15-inch laptop fits in the padded sleeve with room to spare.",
        "The straps are well padded, it's comfortable even fully loaded on my walk to campus.",
        "I got caught in a downpour and everything inside stayed completely dry.",
        "There are loads of small pockets, so my chargers and pens finally have a home.",
        "The zippers are heavy duty and glide smoothly.",
        "After a year of daily use the stitching still looks brand new.",
        "The hidden back pocket for my passport gave me peace of mind while traveling.",
        "It fits under an airplane seat but still holds three days of clothes.",
    ], [
        "One of the shoulder straps ripped at the seam within two months.",
        "The zipper on the main compartment broke in the first week.",
        "It's advertised as water resistant, but my notebook got soaked in light rain.",
        "The laptop sleeve is too small for a 15-inch laptop, despite what the listing says.",
        "There's no padding on the back, so everything inside digs into you.",
        "It has a strong chemical smell that hasn't gone away after a week of airing it out.",
        "The fabric is thin and already has a hole from my keys.",
        "It's much smaller than the photos suggest, it barely fits a lunch and a jacket.",
    ], [
        "It's a standard backpack with the usual pockets.",
        "The size is about right for daily use, not big enough for travel.",
        "The material feels average, time will tell how it holds up.",
    ]),
    "electric kettle": ([
        "It boils a full liter in about three minutes.",
        "The temperature presets are perfect for green tea, I finally stopped scorching it.",
        "It shuts off automatically and the keep-warm function is really handy.",
        "No plastic taste at all, even on the very first use.",
        "The handle stays cool and it pours without dribbling.",
        "It's quiet compared to my old kettle, just a low hum before it clicks off.",
        "The wide opening makes it easy to clean and descale.",
        "The glass body with the blue light looks great on the counter.",
    ], [
        "The water tastes like plastic even after boiling and dumping it a dozen times.",
        "It started leaking from the base after two months.",
        "The lid pops open on its own while boiling and sprays steam everywhere.",
        "It doesn't shut off reliably, I caught it boiling dry once.",
        "The spout dribbles water all over the counter every time I pour.",
        "Rust spots appeared on the bottom plate within a few weeks.",
        "The temperature display is off by almost ten degrees.",
        "It's incredibly loud and rattles like it's about to explode.",
    ], [
        "It boils water in a normal amount of time.",
        "It works fine, though the cord is on the short side.",
        "It's about as fast as any other kettle I've owned.",
    ]),
    "yoga mat": ([
        "Great grip, even in hot yoga my hands don't slide in downward dog.",
        "It's thick enough that my knees don't hurt in low lunges.",
        "It rolls out flat immediately without the ends curling up.",
        "There was barely any smell when I unrolled it, which surprised me.",
        "It's light enough to carry to class on my bike.",
        "The alignment lines are actually useful for keeping my stance even.",
        "It wipes clean easily and hasn't picked up any stains.",
        "After six months of daily practice there's no flaking or worn spots.",
    ], [
        "It smells strongly of rubber, and a week later my living room still stinks.",
        "It gets slippery as soon as my hands are even a little sweaty.",
        "The surface started flaking after a few weeks and leaves bits all over the floor.",
        "It's so thin I can feel the hardwood floor through it in every pose.",
        "The corners keep curling up no matter how long I leave it flat.",
        "It tore near the edge during normal use in the first month.",
        "It shows every footprint and sweat mark and doesn't wipe clean.",
        "It's much shorter than listed, my feet hang off the end in savasana.",
    ], [
        "It's an ordinary mat that works fine for a beginner class.",
        "The thickness is average, neither cushy nor thin.",
        "Grip is okay, about what you'd expect from a mid-range mat.",
    ]),
    "bluetooth speaker": ([
        "It gets surprisingly loud for its size and easily fills my backyard.",
        "The battery lasted an entire weekend camping trip on one charge.",
        "I dropped it in the pool and it kept playing like nothing happened.",
        "The bass is full without getting muddy at higher volume.",
        "Pairing two of them for stereo was effortless.",
        "The range is great, I can leave my phone inside and it doesn't cut out.",
        "The strap makes it easy to hang from a tent or a bike handlebar.",
        "Sound is clear and balanced, voices in podcasts come through really well.",
    ], [
        "It distorts badly once you go past half volume.",
        "The battery barely lasts two hours despite the ten hours claimed.",
        "It disconnects if I walk more than a few steps away with my phone.",
        "It makes a loud beep every time it connects and there's no way to turn it off.",
        "The charging port stopped working after a month, so now it's a paperweight.",
        "It has no real bass at all, everything sounds thin.",
        "It randomly turns itself off in the middle of songs.",
        "Water got in through the port cover after one day at the beach and it died.",
    ], [
        "Sound is fine for background music, nothing more.",
        "Battery life is about what the box says.",
        "It's a typical small speaker for the price range.",
    ]),
    "blender": ([
        "It crushes ice in seconds and my smoothies come out completely smooth.",
        "Frozen fruit and kale blend without me having to stop and stir.",
        "The personal cups are great, I blend and take it straight to work.",
        "Cleanup is easy, a drop of soap and a quick spin and it's basically clean.",
        "The motor is powerful, it even makes decent peanut butter.",
        "The jar is sturdy glass and doesn't hold on to smells.",
        "The pulse button gives me much better control when making salsa.",
        "It's stable on the counter and doesn't walk around at full speed.",
    ], [
        "It leaves chunks of frozen fruit no matter how long I run it.",
        "The jar started leaking from the bottom seal after a few uses.",
        "The motor smells like burning plastic every time I use it.",
        "It's so loud my neighbors can probably hear it.",
        "The blade assembly is nearly impossible to clean properly.",
        "It stalls on anything thicker than a milkshake.",
        "The lid doesn't seal and smoothie sprayed all over my kitchen.",
        "A piece of the blade chipped off into my drink, which is honestly scary.",
    ], [
        "It blends smoothies fine, nothing impressive.",
        "It's loud, but so is every blender I've used.",
        "Power seems average for a blender of this size.",
    ]),
    "office chair": ([
        "My lower back pain is noticeably better since switching to this chair.",
        "Assembly took about twenty minutes and every bolt lined up.",
        "The mesh back keeps me cool during long work days.",
        "The armrests adjust in every direction, so I can finally type with relaxed shoulders.",
        "The cushion is firm but comfortable, even after eight hours.",
        "It rolls smoothly on hardwood without scratching anything.",
        "The lumbar support actually hits the right spot for my height.",
        "It feels really sturdy, no creaking or wobbling.",
    ], [
        "The gas cylinder gave out and the seat slowly sinks while I'm working.",
        "It squeaks every time I lean back, and oiling it didn't help.",
        "The seat cushion flattened to nothing within a couple of months.",
        "Half the screw holes didn't line up and assembly took over two hours.",
        "The armrests wobble and one of them already cracked.",
        "The lumbar support sits way too high and digs into my back.",
        "The fake leather is peeling off at the edges after only six months.",
        "One of the wheels snapped off in the first week.",
    ], [
        "It's a standard office chair, comfortable enough for a few hours.",
        "Assembly was straightforward, about what I expected.",
        "The seat is a little firm, but not bad.",
    ]),
    "air fryer": ([
        "Frozen fries come out crispier than in the oven, in half the time.",
        "Chicken wings are crispy outside and juicy inside, the whole family loves them.",
        "The basket is nonstick and goes straight into the dishwasher.",
        "It's quieter than I expected, just a fan hum.",
        "Preheating takes maybe two minutes, so weeknight dinners are faster.",
        "The basket fits enough for four people, which is perfect for us.",
        "Reheated pizza comes out better than fresh, honestly.",
        "The presets are spot on, I rarely have to adjust the time.",
    ], [
        "The nonstick coating started flaking into the food after a month.",
        "It smells like burning plastic every time it heats up, even after several runs.",
        "The basket is tiny, I have to cook in three batches for a family of four.",
        "Food comes out unevenly cooked, burnt on one side and soggy on the other.",
        "The display stopped working after a few weeks.",
        "The handle came loose and the basket nearly fell out while it was hot.",
        "It's enormous and takes up half my counter.",
        "The fan is loud enough that we can't talk in the kitchen while it runs.",
    ], [
        "It cooks about as well as my oven, just a bit faster.",
        "The basket size is okay for two people.",
        "It works as described, though I'm not using it as much as I thought I would.",
    ]),
    "coffee beans": ([
        "Smooth and chocolatey with no burnt aftertaste.",
        "The beans were clearly roasted recently, the bag smelled amazing when I opened it.",
        "It makes a rich espresso with a thick crema.",
        "Low acidity, so it doesn't upset my stomach like some dark roasts do.",
        "This is my new daily coffee and I've already ordered a second bag.",
        "It tastes great black, I stopped adding sugar.",
        "The resealable bag actually keeps the beans fresh for weeks.",
        "Great value per cup compared to the cafe down the street.",
    ], [
        "It tastes burnt and bitter no matter how I brew it.",
        "The beans were stale, the roast date was over six months ago.",
        "Half the bag was broken bits and dust.",
        "The beans are so oily they clogged my grinder.",
        "Flat and sour, with none of the chocolate notes the label promised.",
        "The bag arrived torn open and the beans smelled like cardboard.",
        "It's weak even when I double the amount I normally use.",
        "It left a weird chemical aftertaste that ruined my morning.",
    ], [
        "It's a decent everyday coffee, not very memorable.",
        "It tastes like a standard dark roast.",
        "Fine for drip coffee, though I wouldn't use it for espresso.",
    ]),
}

# Aspect sentences that fit any product: delivery, service, price, verdict.
GENERIC = {
    "positive": [
        "It arrived a day earlier than promised and was well packaged.",
        "Shipping was fast and the box was in perfect shape.",
        "Customer service answered my question within an hour and was really friendly.",
        "For the price, I honestly don't think you can do better.",
        "I'd happily buy this again.",
        "I've already recommended it to two friends.",
        "Worth every penny.",
        "I've used it daily for a month and I'm still really happy with it.",
        "I got it on sale, but I would gladly pay full price.",
        "It's exactly as described in the listing.",
    ],
    "negative": [
        "Customer service never replied to my emails.",
        "Shipping took almost three weeks even though it said two days.",
        "I'm returning it.",
        "Definitely not worth the money.",
        "The box arrived crushed and looked like it had been opened before.",
        "Support told me this was normal and refused a replacement.",
        "Save yourself the trouble and buy something else.",
        "I regret not reading the negative reviews first.",
        "Way overpriced for what you get.",
        "Very disappointed, this is going back.",
    ],
    "neutral": [
        "Delivery was on time.",
        "The price is fair for what it is.",
        "It does the job.",
        "Not sure yet whether I'd buy it again.",
        "Nothing to complain about, nothing to rave about either.",
        "Three stars feels about right.",
        "It's okay overall.",
        "Packaging was standard.",
    ],
}

# Minor counterpoints that leave the overall label clear (mixed-but-leaning).
CAVEAT = {
    "positive": [
        "The box was a bit dented on arrival, but the product itself was fine.",
        "It looks a little different from the listing photos, but that doesn't bother me.",
        "Delivery took a couple of days longer than promised, but it was worth the wait.",
        "The packaging was a bit excessive, otherwise no complaints at all.",
        "It was slightly pricier than I wanted to pay, but I don't regret it.",
    ],
    "negative": [
        "The packaging looks nice, I'll give it that, but that's about it.",
        "Shipping was fast, for what it's worth, but that doesn't fix the product.",
        "The price was low, and now I know why.",
        "I really wanted to like it because the reviews were so good.",
    ],
}

# Non-English rows, written out in full: (lang, product, label, text).
FOREIGN = [
    ("de", "wireless earbuds", "positive", "Super Klang und der Akku hält den ganzen Arbeitstag. Die Verbindung mit dem Handy klappt sofort, klare Kaufempfehlung."),
    ("de", "electric kettle", "negative", "Nach zwei Wochen tropft der Wasserkocher unten am Sockel. Außerdem schmeckt das Wasser nach Plastik, ich schicke ihn zurück."),
    ("de", "backpack", "positive", "Sehr robuster Rucksack, mein Laptop passt perfekt hinein. Auch bei starkem Regen ist alles trocken geblieben."),
    ("de", "office chair", "negative", "Der Stuhl quietscht bei jeder Bewegung und eine Armlehne wackelt. Der Kundenservice hat auf meine Anfrage nie geantwortet."),
    ("de", "yoga mat", "neutral", "Ganz normale Yogamatte, sie erfüllt ihren Zweck. Nicht besonders dick, aber für den Anfang reicht sie."),
    ("fr", "coffee grinder", "positive", "Mouture très régulière et beaucoup moins bruyant que mon ancien moulin. Je suis ravie de mon achat."),
    ("fr", "air fryer", "negative", "Le revêtement antiadhésif s'écaille déjà après un mois. Très déçu, je ne le recommande pas."),
    ("fr", "bluetooth speaker", "positive", "Le son est puissant pour sa taille et la batterie tient tout le week-end. Parfait pour le camping."),
    ("fr", "phone case", "negative", "La coque a jauni en quelques semaines et les boutons sont très durs à presser. De l'argent gaspillé."),
    ("fr", "blender", "neutral", "Le blender fait des smoothies corrects, sans plus. Un peu bruyant, comme la plupart des modèles."),
]

# Review shapes: P = product sentence, G = generic sentence, C = caveat.
SHAPES = {
    "positive": [("P",), ("P", "P"), ("P", "G"), ("P", "P", "G"), ("P", "C"), ("G", "P")],
    "negative": [("P",), ("P", "P"), ("P", "G"), ("P", "P", "G"), ("C", "P"), ("P", "C")],
    "neutral": [("P",), ("P", "G"), ("P", "P"), ("G", "P")],
}
SHAPE_WEIGHTS = {"positive": [3, 4, 4, 2, 2, 1], "negative": [3, 4, 4, 2, 2, 1], "neutral": [2, 4, 2, 1]}
LABEL_IX = {"positive": 0, "negative": 1, "neutral": 2}


class Deck:
    """Draw items in shuffled rounds so every sentence gets used about equally."""

    def __init__(self, items: list[str], rng: random.Random):
        self.items, self.rng, self.pile = list(items), rng, []

    def draw(self, avoid: list[str]) -> str:
        for _ in range(2 * len(self.items) + 2):
            if not self.pile:
                self.pile = self.items[:]
                self.rng.shuffle(self.pile)
            s = self.pile.pop()
            if s not in avoid:
                return s
        raise RuntimeError("could not draw a distinct sentence")


def build() -> list[dict]:
    rng = random.Random(7)
    decks: dict[tuple, Deck] = {}

    def deck(key: tuple, items: list[str]) -> Deck:
        if key not in decks:
            decks[key] = Deck(items, rng)
        return decks[key]

    rows, seen = [], set()
    for label, n in N_EN.items():
        products = sorted(PRODUCTS)
        rng.shuffle(products)
        for i in range(n):
            product = products[i % len(products)]
            for _ in range(100):
                shape = rng.choices(SHAPES[label], SHAPE_WEIGHTS[label])[0]
                parts: list[str] = []
                for kind in shape:
                    if kind == "P":
                        pool = PRODUCTS[product][LABEL_IX[label]]
                        parts.append(deck((product, label), pool).draw(parts))
                    elif kind == "G":
                        parts.append(deck(("G", label), GENERIC[label]).draw(parts))
                    else:
                        parts.append(deck(("C", label), CAVEAT[label]).draw(parts))
                text = " ".join(parts)
                if text not in seen and 10 <= len(text.split()) <= 60:
                    break
            else:
                raise RuntimeError(f"no unique review for {product}/{label}")
            seen.add(text)
            rows.append({"product": product, "lang": "en", "text": text, "label": label})
    for lang, product, label, text in FOREIGN:
        assert text not in seen and 10 <= len(text.split()) <= 60, text
        seen.add(text)
        rows.append({"product": product, "lang": lang, "text": text, "label": label})

    rng.shuffle(rows)
    for i, row in enumerate(rows, start=1):
        row["review_id"] = f"r{i:04d}"
        row["max_new"] = 3 + zlib.crc32(row["review_id"].encode()) % 6  # 3..8
    return rows


SCHEMA = pa.schema([
    ("review_id", pa.string()),
    ("product", pa.string()),
    ("lang", pa.string()),
    ("text", pa.string()),
    ("label", pa.string()),
    ("max_new", pa.int32()),
])


def main() -> None:
    rows = build()
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, OUT, compression="zstd")
    print(f"wrote {table.num_rows} rows to {OUT}")


if __name__ == "__main__":
    main()
