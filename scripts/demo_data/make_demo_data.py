"""Regenerate crb's demo data: retail chat and code records, and the tiny Mistral's config and tokenizer.

Everything is built from templates with a fixed seed, so a re-run writes the same files:

    python scripts/demo_data/make_demo_data.py

Writes, next to this script: retail_chat.jsonl (ChatML conversations of a store assistant),
retail_code.jsonl (small Python functions and classes of retail logic) and tiny-mistral/
(config.json and a byte-level BPE tokenizer trained on both files; no weights, the demo
builds the model from its config with random init).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parents[2] / "crb" / "demo_data"  # where the shipped data files live
SEED = 20240611
N_CHAT = 240
N_CODE = 150
MAX_WORDS = 120
VOCAB_SIZE = 1024
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

STORE = "Brightline"
SYSTEM_PROMPTS = [
    f"You are {STORE}'s store assistant. Answer briefly and accurately.",
    f"You are a helpful assistant for {STORE}, a store selling clothing, shoes, electronics and groceries.",
    f"You help {STORE} customers with stock, orders, returns and store policies. Be friendly and concise.",
    "You are a retail store assistant. Keep answers short and friendly.",
    f"You are the {STORE} shopping assistant. Give clear, short answers.",
]

# Store policy: every answer below is consistent with these facts.
HOURS = {"Monday": ("9 am", "9 pm"), "Tuesday": ("9 am", "9 pm"), "Wednesday": ("9 am", "9 pm"),
         "Thursday": ("9 am", "9 pm"), "Friday": ("9 am", "9 pm"), "Saturday": ("9 am", "8 pm"),
         "Sunday": ("10 am", "6 pm")}
HOLIDAYS = {"Christmas Day": None, "Thanksgiving": None, "New Year's Day": ("11 am", "5 pm"),
            "Boxing Day": ("8 am", "8 pm"), "Easter Sunday": ("11 am", "5 pm"), "Labor Day": ("10 am", "6 pm")}
RETURN_DAYS = {"clothing": 30, "shoes": 30, "electronics": 14}
FREE_DELIVERY_OVER = 50
STANDARD_FEE = 4.95
EXPRESS_FEE = 9.95
INSTALMENTS_OVER = 150
POINTS_PER_VOUCHER, VOUCHER_VALUE = 100, 5
GIFT_MIN, GIFT_MAX = 10, 500
PAYMENTS_OK = ["Visa", "Mastercard", "American Express", "debit cards", "Apple Pay", "Google Pay", "cash",
               "contactless"]
PAYMENTS_NO = ["cheques", "cryptocurrency", "Bitcoin", "foreign currency"]
CITIES = ["Boston", "Denver", "Austin", "Seattle", "Chicago", "Portland", "Atlanta", "Phoenix", "Miami"]


@dataclass(frozen=True)
class Product:
    """A catalog entry; `size_one`/`size_many` phrase one size ('size 40R') or several ('sizes 38R and 40R')."""

    name: str
    category: str
    sizes: tuple[str, ...]
    colours: tuple[str, ...]
    prices: tuple[float, ...]  # one price, or one per size
    size_one: str = "size {}"
    size_many: str = "sizes {}"
    plural: str = ""  # the general plural ('suits'); empty for plural ('chinos') and mass ('olive oil') names
    variant_word: str = "colour"
    many: bool = False  # the name is grammatically plural ('running shoes')

    @property
    def general(self) -> str:
        """The product line in general: 'suits', 'chinos', 'olive oil'."""
        return self.plural or self.name

    @property
    def general_be(self) -> str:
        return "are" if self.plural or self.many else "is"

    def price(self, size: str) -> float:
        return self.prices[self.sizes.index(size)] if len(self.prices) > 1 else self.prices[0]


CATALOG = [
    Product("suit", "clothing", ("36R", "38R", "40R", "42R", "44R", "40L", "42L"),
            ("navy", "charcoal", "black", "light grey", "blue"), (249,), plural="suits"),
    Product("dress shirt", "clothing", ("S", "M", "L", "XL", "XXL"),
            ("white", "light blue", "pink", "black", "blue striped"), (45,), plural="dress shirts"),
    Product("linen shirt", "clothing", ("S", "M", "L", "XL"), ("white", "sand", "sage green", "navy"), (39,),
            plural="linen shirts"),
    Product("chinos", "clothing", ("30", "32", "34", "36", "38"), ("beige", "navy", "olive", "black"), (55,),
            many=True),
    Product("rain jacket", "clothing", ("XS", "S", "M", "L", "XL"), ("olive", "navy", "black", "yellow"), (79,),
            plural="rain jackets"),
    Product("denim jacket", "clothing", ("S", "M", "L", "XL"), ("light wash", "dark wash", "black"), (65,),
            plural="denim jackets"),
    Product("wool coat", "clothing", ("S", "M", "L", "XL"), ("camel", "charcoal", "navy"), (189,),
            plural="wool coats"),
    Product("wrap dress", "clothing", ("2", "4", "6", "8", "10", "12", "14"),
            ("red", "black", "emerald", "floral print", "navy"), (69,), plural="wrap dresses"),
    Product("summer dress", "clothing", ("XS", "S", "M", "L"), ("yellow", "white", "sky blue", "floral print"),
            (49,), plural="summer dresses"),
    Product("running shoes", "shoes", ("7", "8", "8.5", "9", "9.5", "10", "11", "12"),
            ("white", "black", "grey", "neon green"), (89,), many=True),
    Product("leather oxford shoes", "shoes", ("7", "8", "9", "10", "11", "12"), ("black", "brown", "tan"), (129,),
            many=True),
    Product("ankle boots", "shoes", ("5", "6", "7", "8", "9", "10"), ("black", "chestnut", "taupe"), (110,),
            many=True),
    Product("wireless headphones", "electronics", ("over-ear", "in-ear"), ("black", "white", "midnight blue"),
            (149, 99), size_one="the {} version", size_many="the {} versions", many=True),
    Product("tablet", "electronics", ("64 GB", "128 GB", "256 GB"), ("silver", "space grey", "blue"),
            (329, 399, 479), size_one="the {} model", size_many="the {} models", plural="tablets"),
    Product("smartwatch", "electronics", ("41 mm", "45 mm"), ("black", "silver", "rose gold"), (199, 229),
            size_one="the {} size", size_many="the {} sizes", plural="smartwatches"),
    Product("laptop", "electronics", ("13-inch", "15-inch"), ("silver", "graphite"), (899, 1099),
            size_one="the {} model", size_many="the {} models", plural="laptops"),
    Product("Bluetooth speaker", "electronics", ("mini", "standard", "large"), ("black", "red", "teal"),
            (39, 59, 89), size_one="the {} size", size_many="the {} sizes", plural="Bluetooth speakers"),
    Product("coffee beans", "groceries", ("250 g", "500 g", "1 kg"), ("house blend", "dark roast", "decaf", "organic"),
            (6.49, 11.99, 21.99), size_one="the {} bag", size_many="the {} bags", variant_word="variety", many=True),
    Product("olive oil", "groceries", ("500 ml", "1 litre"), ("extra virgin", "light", "organic extra virgin"),
            (8.49, 14.99), size_one="the {} bottle", size_many="the {} bottles", variant_word="variety"),
    Product("basmati rice", "groceries", ("1 kg", "5 kg"), ("white", "brown", "organic"), (3.49, 12.99),
            size_one="the {} bag", size_many="the {} bags", variant_word="variety"),
    Product("oat milk", "groceries", ("1 litre", "6 x 1 litre"), ("original", "barista", "unsweetened"),
            (2.29, 12.49), size_one="the {} pack", size_many="the {} packs", variant_word="variety"),
]

Pair = tuple[str, str]


def money(x: float) -> str:
    return f"${x:,.0f}" if float(x).is_integer() else f"${x:,.2f}"


def join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def greet(rng: random.Random, text: str, first: bool) -> str:
    """Sometimes prefix a user message with a greeting (first turn) or a connective (later turns)."""
    pool = ["Hi! ", "Hello, ", "Hi there. ", "Quick question: "] if first else ["Also, ", "One more thing: ", "And "]
    if rng.random() < 0.3:
        head = rng.choice(pool)
        keep = head.endswith((". ", "! ")) or text.startswith(("I ", "I'm "))
        return head + (text if keep else text[:1].lower() + text[1:])
    return text


# ---- product conversations ------------------------------------------------------------------------------------


@dataclass
class Ask:
    """The product, colour and size a product conversation is about, with its grammar."""

    p: Product
    colour: str
    size: str
    status: str  # in, low, out

    @property
    def what(self) -> str:
        return f"{self.colour} {self.p.name}"

    @property
    def sp(self) -> str:
        return self.p.size_one.format(self.size)

    @property
    def be(self) -> str:
        return "are" if self.p.many else "is"

    @property
    def it(self) -> str:
        return "them" if self.p.many else "it"

    @property
    def they(self) -> str:
        return "they" if self.p.many else "it"

    @property
    def cost(self) -> str:
        return "cost" if self.p.many else "costs"

    @property
    def price(self) -> str:
        return money(self.p.price(self.size))


def stock_exchange(rng: random.Random, a: Ask) -> Pair:
    """A question about one product, colour and size, answered according to its stock status."""
    q = rng.choice([
        f"Do you have the {a.what} in {a.sp}?",
        f"Is the {a.what} available in {a.sp}?" if not a.p.many else f"Are the {a.what} available in {a.sp}?",
        f"I'm looking for the {a.what} in {a.sp}. {cap(a.be)} {a.they} in stock?",
        f"Have you got the {a.what} in {a.sp}?",
        f"Any {a.what} left in {a.sp}?",
        f"Can you check stock of the {a.what} in {a.sp}, please?",
    ])
    if a.status == "in":
        ans = rng.choice([
            f"Yes, the {a.what} {a.be} in stock in {a.sp}. {cap(a.they)} {a.cost} {a.price}.",
            f"Good news: we have the {a.what} in {a.sp} in stock, priced at {a.price}.",
            f"Yes! The {a.what} in {a.sp} {a.be} on the shelf now, at {a.price}.",
        ])
    elif a.status == "low":
        n = rng.randint(1, 3)
        ans = rng.choice([
            f"We have just {n} left of the {a.what} in {a.sp}, so I'd reserve {a.it} soon. "
            f"{cap(a.they)} {a.cost} {a.price}.",
            f"Yes, but stock is low: only {n} of the {a.what} in {a.sp} remaining. The price is {a.price}.",
        ])
    else:
        other_sizes = [s for s in a.p.sizes if s != a.size]
        other_colours = [c for c in a.p.colours if c != a.colour]
        alt_size = a.p.size_one.format(rng.choice(other_sizes))
        alt_colour = rng.choice(other_colours)
        when = rng.choice(["next Tuesday", "by Friday", "within a week", "early next week", "in about ten days"])
        ans = rng.choice([
            f"Sorry, the {a.what} {a.be} out of stock in {a.sp}. We have {a.it} in {alt_size}, "
            f"or in {alt_colour} in {a.sp}.",
            f"I'm afraid the {a.what} in {a.sp} {a.be} sold out. New stock is expected {when}; "
            f"the {alt_colour} {a.p.name} in {a.sp} is available now.",
            f"The {a.what} in {a.sp} {a.be} sold out in store but still available online, "
            f"with free delivery on orders over {money(FREE_DELIVERY_OVER)}.",
        ])
    return q, ans


def range_exchange(rng: random.Random, p: Product) -> Pair:
    """A general question about a product line: a colour in general, its colours, or its sizes."""
    kind = rng.choice(["colour", "colour", "colours", "sizes"])  # 'Do you have navy suits?' is the demo's prompt
    if kind == "colour":
        colour = rng.choice(p.colours)
        general = p.general
        sizes = sorted(rng.sample(p.sizes, k=min(len(p.sizes), rng.randint(2, 3))), key=p.sizes.index)
        q = rng.choice([f"Do you have {colour} {general}?", f"Do you sell {colour} {general}?",
                        f"Have you got any {colour} {general} in stock?"])
        ans = rng.choice([
            f"Yes, we have {colour} {general} in stock in {p.size_many.format(join(sizes))}.",
            f"We do! {cap(colour)} {general} {p.general_be} available in {p.size_many.format(join(sizes))} "
            "right now.",
        ])
    elif kind == "colours":
        word = p.variant_word
        plural_word = "varieties" if word == "variety" else word + "s"
        do = "do" if p.many else "does"
        q = rng.choice([f"What {plural_word} {do} the {p.name} come in?",
                        f"Which {plural_word} of the {p.name} do you have?"])
        ans = f"The {p.name} {'come' if p.many else 'comes'} in {join(list(p.colours))}."
        if rng.random() < 0.5:
            ans += f" {cap('they' if p.many else 'it')} {'cost' if p.many else 'costs'} " + (
                money(p.prices[0]) + "." if len(p.prices) == 1 else f"from {money(min(p.prices))}.")
    else:
        q = rng.choice([f"What sizes do you have in the {p.name}?", f"Which sizes does the {p.name} come in?"
                        if not p.many else f"Which sizes do the {p.name} come in?"])
        ans = f"The {p.name} {'are' if p.many else 'is'} available in {p.size_many.format(join(list(p.sizes)))}."
        if len(p.prices) > 1:
            prices = zip(p.sizes, p.prices, strict=True)
            ans += " Prices: " + ", ".join(f"{s} {money(x)}" for s, x in prices) + "."
    return q, ans


def product_followup(rng: random.Random, a: Ask, used: set[str]) -> tuple[str, Pair]:
    """A follow-up question about the product of the conversation, not one of `used`."""
    kinds = ["delivery", "colours", "discount", "points"]
    kinds.append("reserve" if a.status != "out" else "price")  # in/low answers already give the price
    if a.p.category in RETURN_DAYS:
        kinds.append("return")
    kind = rng.choice([k for k in kinds if k not in used])
    p = a.p
    if kind == "price":
        q = rng.choice([f"How much {a.be} {a.they}?", "What's the price?", f"How much do{'' if a.p.many else 'es'} "
                        f"the {a.what} cost?"])
        return kind, (q, f"The {a.what} in {a.sp} {a.cost} {a.price}.")
    if kind == "delivery":
        q = rng.choice([f"Can I get {a.it} delivered?", "Do you deliver?", "How much is delivery?"])
        price = p.price(a.size)
        if price >= FREE_DELIVERY_OVER:
            ans = (f"Yes. At {a.price}, standard delivery (3-5 working days) is free. Express next-day delivery "
                   f"is {money(EXPRESS_FEE)}.")
        else:
            ans = (f"Yes. Standard delivery is {money(STANDARD_FEE)}, or free on orders over "
                   f"{money(FREE_DELIVERY_OVER)}. Express next-day delivery is {money(EXPRESS_FEE)}.")
        return kind, (q, ans)
    if kind == "colours":
        word = p.variant_word
        others = [c for c in p.colours if c != a.colour]
        q = rng.choice([f"Do you have {a.it} in another {word}?", f"What other {word}s are there?"
                        if word == "colour" else "What other varieties are there?"])
        return kind, (q, f"The {p.name} also {'come' if p.many else 'comes'} in {join(others)}.")
    if kind == "discount":
        q = rng.choice([f"Is there any discount on {a.it}?", f"{cap(a.be)} {a.they} on sale?"])
        price = p.price(a.size)
        ans = (f"The {p.name} isn't on sale right now, but students get 10% off with a valid ID, "
               f"which brings {a.it} to {money(round(price * 0.9, 2))}.")
        return kind, (q, ans)
    if kind == "points":
        q = rng.choice([f"How many loyalty points would I get for {a.it}?", "Do I earn points on this?"])
        pts = int(p.price(a.size))
        return kind, (q, f"{STORE} Rewards members earn 1 point per dollar, so the {a.what} would earn you "
                         f"{pts} points.")
    if kind == "reserve":
        q = rng.choice([f"Can you hold {a.it} for me?", f"Can I reserve {a.it}?", f"Could you put {a.it} aside?"])
        return kind, (q, f"Yes, we can hold the {a.what} in {a.sp} at the service desk for 48 hours. "
                         "Just give your name at the till.")
    days = RETURN_DAYS[p.category]
    if p.category == "electronics":
        q = rng.choice([f"Can I return {a.it} if I change my mind?", "What's the return policy on electronics?"])
        ans = (f"Electronics can be returned within {days} days if unopened, with the receipt. "
               "Faulty items are covered by the one-year warranty.")
    else:
        q = rng.choice([f"Can I return {a.it} if {a.they} {'don' if a.p.many else 'doesn'}'t fit?",
                        f"What if {a.they} {'don' if a.p.many else 'doesn'}'t fit?"])
        ans = (f"No problem: unworn {p.category} can be returned within {days} days with the receipt for a "
               "full refund or an exchange.")
    return kind, (q, ans)


THANKS: list[Pair] = [
    ("Great, thanks!", "You're welcome! Let me know if you need anything else."),
    ("Thank you.", f"My pleasure. Enjoy shopping at {STORE}!"),
    ("Perfect, thanks for your help.", "Glad I could help. Have a great day!"),
    ("Thanks, that's all.", "You're welcome. Have a nice day!"),
]


def product_conversation(rng: random.Random) -> list[Pair]:
    p = rng.choice(CATALOG)
    if rng.random() < 0.35:
        return [range_exchange(rng, p)] + ([rng.choice(THANKS)] if rng.random() < 0.3 else [])
    a = Ask(p, rng.choice(p.colours), rng.choice(p.sizes), rng.choices(["in", "low", "out"], [5, 2, 3])[0])
    pairs = [stock_exchange(rng, a)]
    turns = rng.choices([1, 2, 3], [5, 3, 2])[0]
    used: set[str] = set()
    while len(pairs) < turns:
        if rng.random() < 0.2 and len(pairs) == turns - 1:
            pairs.append(rng.choice(THANKS))
            break
        kind, pair = product_followup(rng, a, used)
        used.add(kind)
        pairs.append(pair)
    return pairs


# ---- store policy conversations -------------------------------------------------------------------------------


def hours_pair(rng: random.Random) -> Pair:
    kind = rng.choice(["day", "day", "close", "holiday", "all"])
    day = rng.choice(list(HOURS))
    opens, closes = HOURS[day]
    if kind == "day":
        q = rng.choice([f"What time do you open on {day}?", f"What are your opening hours on {day}?",
                        f"Are you open on {day}?"])
        yes = "Yes, on" if q.startswith("Are") else "On"
        return q, f"{yes} {day}s we're open from {opens} to {closes}."
    if kind == "close":
        q = rng.choice([f"When do you close on {day}?", f"How late are you open on {day}?"])
        return q, f"We close at {closes} on {day}s, and open at {opens}."
    if kind == "holiday":
        name = rng.choice(list(HOLIDAYS))
        hrs = HOLIDAYS[name]
        q = rng.choice([f"Are you open on {name}?", f"What are your hours on {name}?"])
        if hrs is None:
            return q, f"Sorry, all {STORE} stores are closed on {name}. The online shop stays open."
        yes = "Yes, on" if q.startswith("Are") else "On"
        return q, f"{yes} {name} we're open from {hrs[0]} to {hrs[1]}."
    q = rng.choice(["What are your store hours?", "When are you open?", "What are your opening times?"])
    return q, ("We're open Monday to Friday 9 am to 9 pm, Saturday 9 am to 8 pm, and Sunday 10 am to 6 pm.")


def returns_pair(rng: random.Random) -> Pair:
    kind = rng.choice(["item", "item", "receipt", "online", "refund"])
    if kind == "item":
        p = rng.choice(CATALOG)
        n = rng.choice([2, 5, 9, 12, 16, 20, 25, 29, 33, 40, 45, 60])
        what = f"a {p.name}" if p.plural else f"the {p.name}"
        q = rng.choice([f"I bought {what} {n} days ago. Can I still return {'them' if p.many else 'it'}?",
                        f"Can I return {what} I bought {n} days ago?"])
        if p.category == "groceries":
            return q, ("Food can't be returned unless it's faulty or past its date. In that case bring it back "
                       "with the receipt and we'll refund it.")
        days = RETURN_DAYS[p.category]
        if n <= days:
            cond = "unopened" if p.category == "electronics" else "unworn with the tags on"
            return q, (f"Yes. {cap(p.category)} can be returned within {days} days, so you have {days - n} days left. "
                       f"Bring it {cond} with your receipt for a full refund.")
        return q, (f"Sorry, {p.category} can only be returned within {days} days, and it has been {n}. "
                   "If it's faulty, bring it in and we'll take a look.")
    if kind == "receipt":
        q = rng.choice(["Can I return something without a receipt?", "I lost my receipt. Can I still return this?"])
        return q, ("Without a receipt we can offer an exchange or store credit, within the return period. "
                   "A bank statement or order email also counts as proof of purchase.")
    if kind == "online":
        q = rng.choice(["Can I return an online order in store?", "How do I return something I ordered online?"])
        return q, (f"You can return online orders at any {STORE} store, or by post with the prepaid label "
                   "in the parcel.")
    q = rng.choice(["How long does a refund take?", "When will I get my refund?"])
    return q, ("Refunds go back to the original payment method. Card refunds take 3-5 working days to appear; "
               "cash purchases are refunded in cash at the till.")


def delivery_pair(rng: random.Random) -> Pair:
    kind = rng.choice(["cost", "cost", "time", "track", "collect"])
    if kind == "cost":
        amt = rng.choice([12, 18, 24.5, 32, 39.99, 45, 49, 52, 65, 80, 120, 210])
        q = rng.choice([f"How much is delivery on an order of {money(amt)}?",
                        f"Do I pay for shipping on {money(amt)}?"])
        if amt >= FREE_DELIVERY_OVER:
            return q, (f"Standard delivery is free on orders over {money(FREE_DELIVERY_OVER)}, so it's free for "
                       f"{money(amt)}. Express next-day delivery is {money(EXPRESS_FEE)}.")
        gap = round(FREE_DELIVERY_OVER - amt, 2)
        return q, (f"Standard delivery is {money(STANDARD_FEE)} on {money(amt)}. Spend {money(gap)} more "
                   f"and it's free (orders over {money(FREE_DELIVERY_OVER)}).")
    if kind == "time":
        city = rng.choice(CITIES)
        q = rng.choice([f"How long does delivery take to {city}?", f"When would an order arrive in {city}?"])
        return q, (f"Standard delivery to {city} takes 3-5 working days. Express delivery arrives the next "
                   f"working day if you order before 8 pm, for {money(EXPRESS_FEE)}.")
    if kind == "track":
        order = f"BL{rng.randint(100000, 999999)}"
        q = rng.choice([f"How do I track my order {order}?", f"Where is my order {order}?"])
        return q, (f"You'll find the tracking link for order {order} in your confirmation email, "
                   "or under My Orders in the app.")
    q = rng.choice(["Can I order online and pick up in store?", "Do you do click and collect?"])
    return q, ("Yes, Click & Collect is free. Most orders are ready within 2 hours; we text you when it's waiting "
               "at the service desk, and we keep it for 7 days.")


def payment_pair(rng: random.Random) -> Pair:
    kind = rng.choice(["method", "method", "instalments", "split"])
    if kind == "method":
        if rng.random() < 0.7:
            m = rng.choice(PAYMENTS_OK)
            q = rng.choice([f"Do you accept {m}?", f"Can I pay with {m}?"])
            where = " in store" if m == "cash" else ""
            return q, f"Yes, we accept {m}{where}. We also take gift cards and all major cards."
        m = rng.choice(PAYMENTS_NO)
        q = rng.choice([f"Do you accept {m}?", f"Can I pay with {m}?"])
        return q, (f"Sorry, we don't accept {m}. You can pay by card, Apple Pay, Google Pay, cash or gift card.")
    if kind == "instalments":
        amt = rng.choice([80, 120, 149, 180, 249, 399, 899])
        q = rng.choice([f"Can I pay in instalments for a {money(amt)} purchase?", f"Can I spread the cost of "
                        f"{money(amt)}?"])
        if amt > INSTALMENTS_OVER:
            part = round(amt / 3, 2)
            return q, (f"Yes. Orders over {money(INSTALMENTS_OVER)} can be split into 3 interest-free monthly "
                       f"payments, so about {money(part)} a month.")
        return q, (f"Instalments are only available on orders over {money(INSTALMENTS_OVER)}, "
                   f"so {money(amt)} is paid in full at checkout.")
    q = rng.choice(["Can I pay with two cards?", "Can I split the payment?"])
    return q, ("Yes, in store you can split a payment across two cards, or a card and a gift card. "
               "Online you can combine one gift card with a card.")


def loyalty_pair(rng: random.Random) -> Pair:
    kind = rng.choice(["value", "value", "earn", "join", "expire"])
    if kind == "value":
        pts = rng.choice([40, 85, 120, 250, 310, 480, 650, 999, 1200, 1575])
        q = rng.choice([f"I have {pts} points. What are they worth?", f"How much can I get for {pts} loyalty points?"])
        vouchers = pts // POINTS_PER_VOUCHER
        if vouchers == 0:
            return q, (f"Every {POINTS_PER_VOUCHER} points gives a {money(VOUCHER_VALUE)} voucher, so you need "
                       f"{POINTS_PER_VOUCHER - pts} more points for your first one.")
        return q, (f"Every {POINTS_PER_VOUCHER} points is a {money(VOUCHER_VALUE)} voucher, so {pts} points "
                   f"are worth {money(vouchers * VOUCHER_VALUE)}.")
    if kind == "earn":
        amt = rng.choice([23.5, 48, 75.2, 99, 140, 249, 320.75])
        q = rng.choice([f"How many points do I get for spending {money(amt)}?",
                        f"If I spend {money(amt)}, how many points will I earn?"])
        return q, f"You earn 1 point per dollar spent, so {money(amt)} earns {int(amt)} points."
    if kind == "join":
        q = rng.choice(["How do I join the loyalty program?", f"How can I sign up for {STORE} Rewards?"])
        return q, (f"{STORE} Rewards is free: join in our app, on the website, or at any till with your email "
                   "address. You start earning points on your next purchase.")
    q = rng.choice(["Do my points expire?", "How long do loyalty points last?"])
    return q, ("Points expire after 12 months without any purchase or redemption; any activity keeps them all "
               "valid.")


def discount_pair(rng: random.Random) -> Pair:
    kind = rng.choice(["calc", "calc", "student", "senior", "code"])
    if kind == "calc":
        p = rng.choice(CATALOG)
        size = rng.choice(p.sizes)
        price = p.price(size)
        pct = rng.choice([10, 15, 20, 25, 30, 40, 50])
        save = round(price * pct / 100, 2)
        article = "a " if p.plural else ""
        q = rng.choice([f"What is {pct}% off {article}{money(price)} {p.name}?",
                        f"If the {p.name} {'are' if p.many else 'is'} {money(price)} and {pct}% off, what do I pay?"])
        return q, f"{pct}% off {money(price)} saves {money(save)}, so you'd pay {money(round(price - save, 2))}."
    if kind == "student":
        q = rng.choice(["Do you have a student discount?", "Is there a discount for students?"])
        return q, ("Yes, students get 10% off with a valid student ID or a verified student account in our app. "
                   "It can't be combined with other offers.")
    if kind == "senior":
        q = rng.choice(["Are there discounts for seniors?", "Do you offer a senior discount?"])
        return q, "Yes, customers aged 65 and over get 10% off every Tuesday. Just show an ID at the till."
    code = rng.choice(["SPRING", "WELCOME", "SAVE", "EXTRA", "SUMMER"]) + str(rng.choice([10, 15, 20]))
    q = rng.choice([f"My discount code {code} isn't working.", f"Why won't the code {code} apply?"])
    return q, (f"Codes like {code} are case-sensitive, can be used once per account, and often have an expiry "
               "date or minimum spend. Check those, and I can look into it if it still fails.")


def gift_pair(rng: random.Random) -> Pair:
    kind = rng.choice(["buy", "buy", "expire", "balance", "online", "lost"])
    if kind == "buy":
        amt = rng.choice([5, 10, 25, 50, 75, 100, 150, 200, 500, 750, 1000])
        q = rng.choice([f"Can I buy a {money(amt)} gift card?", f"Do you sell {money(amt)} gift cards?"])
        if GIFT_MIN <= amt <= GIFT_MAX:
            return q, (f"Yes, {money(amt)} works: gift cards can be loaded with any amount from {money(GIFT_MIN)} "
                       f"to {money(GIFT_MAX)}, in store or online.")
        return q, (f"Gift cards take any amount from {money(GIFT_MIN)} to {money(GIFT_MAX)}, so {money(amt)} "
                   "isn't possible on one card. You could buy more than one.")
    if kind == "expire":
        q = rng.choice(["Do gift cards expire?", "How long is a gift card valid?"])
        return q, f"{STORE} gift cards never expire, and can be used in store and online."
    if kind == "balance":
        q = rng.choice(["How can I check my gift card balance?", "How much is left on my gift card?"])
        return q, ("Check the balance on our website with the card number and PIN, in the app, or at any till.")
    if kind == "online":
        q = rng.choice(["Can I use a gift card online?", "How do I pay with a gift card on the website?"])
        return q, "Yes: at checkout choose Gift Card and enter the 16-digit number and the PIN on the back."
    q = rng.choice(["I lost my gift card. Can you replace it?", "What happens if I lose my gift card?"])
    return q, ("If you have the purchase receipt, we can block the lost card and move the remaining balance "
               "to a new one.")


TOPICS: list[Callable[[random.Random], Pair]] = [hours_pair, returns_pair, delivery_pair, payment_pair,
                                                 loyalty_pair, discount_pair, gift_pair]


def policy_conversation(rng: random.Random) -> list[Pair]:
    turns = rng.choices([1, 2, 3], [6, 3, 1])[0]
    topics = rng.sample(TOPICS, k=turns)
    pairs = [t(rng) for t in topics]
    if turns > 1 and rng.random() < 0.3:
        pairs[-1] = rng.choice(THANKS)
    return pairs


def chat_records(rng: random.Random, n: int) -> list[dict]:
    out: list[dict] = []
    seen: set[str] = set()
    while len(out) < n:
        pairs = product_conversation(rng) if rng.random() < 0.55 else policy_conversation(rng)
        messages = []
        if rng.random() < 0.8:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for i, (q, a) in enumerate(pairs):
            thanks = any(q == t for t, _ in THANKS)
            messages.append({"role": "user", "content": q if thanks else greet(rng, q, first=i == 0)})
            messages.append({"role": "assistant", "content": a})
        key = json.dumps(messages[-2:])
        if sum(len(m["content"].split()) for m in messages) > MAX_WORDS or key in seen:
            continue
        seen.add(key)
        out.append({"messages": messages})
    return out


# ---- code records ---------------------------------------------------------------------------------------------

CodeGen = Callable[[random.Random], list[str]]


def docstring(rng: random.Random, text: str, indent: str = "    ") -> list[str]:
    return [f'{indent}"""{text}"""'] if rng.random() < 0.7 else []


def code_percent_discount(rng: random.Random) -> list[str]:
    fn = rng.choice(["apply_discount", "discounted_price", "price_after_discount", "sale_price"])
    p = rng.choice(["price", "amount", "unit_price"])
    d = rng.choice(["percent", "discount_pct", "pct_off"])
    top = rng.choice([50, 60, 70, 80, 90])
    return [f"def {fn}({p}: float, {d}: float) -> float:",
            *docstring(rng, f"Return {p} reduced by {d} percent, capped at {top}%."),
            f"    if {p} < 0:",
            f'        raise ValueError("{p} must not be negative")',
            f"    {d} = max(0.0, min({d}, {top}.0))",
            f"    return round({p} * (1 - {d} / 100), 2)"]


def code_tiered_discount(rng: random.Random) -> list[str]:
    fn = rng.choice(["tiered_discount", "volume_discount", "cart_discount", "spend_discount"])
    const = rng.choice(["TIERS", "DISCOUNT_TIERS", "SPEND_TIERS"])
    lows = sorted(rng.sample([50, 75, 100, 150, 200, 250, 300, 500], 3))
    rates = sorted(rng.sample([0.05, 0.1, 0.12, 0.15, 0.2, 0.25], 3))
    tiers = ", ".join(f"({lo}, {r})" for lo, r in zip(reversed(lows), reversed(rates), strict=True))
    return [f"{const} = [{tiers}]",
            "",
            "",
            f"def {fn}(subtotal: float) -> float:",
            *docstring(rng, "Discount for the highest spend tier reached by the subtotal."),
            f"    for threshold, rate in {const}:",
            "        if subtotal >= threshold:",
            "            return round(subtotal * rate, 2)",
            "    return 0.0"]


def code_sales_tax(rng: random.Random) -> list[str]:
    const = rng.choice(["TAX_RATE", "SALES_TAX", "VAT_RATE"])
    rate = rng.choice([0.05, 0.0625, 0.07, 0.0725, 0.08, 0.0875, 0.2])
    fn = rng.choice(["add_tax", "with_tax", "gross_price", "price_incl_tax"])
    exempt = rng.choice(["groceries", "food", "books"])
    return ["from decimal import ROUND_HALF_UP, Decimal", "", f"{const} = Decimal(\"{rate}\")", "", "",
            f"def {fn}(net: Decimal, category: str = \"general\") -> Decimal:",
            *docstring(rng, f"Net price plus sales tax; {exempt} are tax-exempt."),
            f"    if category == \"{exempt}\":",
            "        return net",
            f"    gross = net * (1 + {const})",
            "    return gross.quantize(Decimal(\"0.01\"), rounding=ROUND_HALF_UP)"]


def code_cart_total(rng: random.Random) -> list[str]:
    cls = rng.choice(["CartItem", "LineItem", "BasketLine", "OrderLine"])
    fn = rng.choice(["cart_total", "order_total", "basket_total", "subtotal"])
    qty = rng.choice(["qty", "quantity", "count"])
    ship = rng.choice([0, 3.99, 4.95, 5.5])
    free_over = rng.choice([35, 50, 75, 100])
    lines = ["from dataclasses import dataclass", "", "", "@dataclass", f"class {cls}:",
             "    sku: str", "    price: float", f"    {qty}: int = 1", "", "",
             f"def {fn}(items: list[{cls}]) -> float:",
             *docstring(rng, "Sum of price times quantity, plus shipping under the free threshold."),
             f"    total = sum(item.price * item.{qty} for item in items)"]
    if ship:
        lines += [f"    if 0 < total < {free_over}:", f"        total += {ship}"]
    return [*lines, "    return round(total, 2)"]


def code_points_earned(rng: random.Random) -> list[str]:
    fn = rng.choice(["points_earned", "loyalty_points", "earn_points", "reward_points"])
    per = rng.choice([1, 2, 5, 10])
    const = rng.choice(["TIER_MULTIPLIER", "MULTIPLIERS", "TIER_BONUS"])
    gold, plat = rng.choice([(1.5, 2), (1.25, 1.5), (2, 3)])
    return [f"{const} = {{\"basic\": 1, \"gold\": {gold}, \"platinum\": {plat}}}",
            f"POINTS_PER_DOLLAR = {per}", "", "",
            f"def {fn}(spend: float, tier: str = \"basic\") -> int:",
            *docstring(rng, "Points for a purchase: whole dollars times the rate and the tier multiplier."),
            f"    if tier not in {const}:",
            "        raise KeyError(f\"unknown tier: {tier}\")",
            f"    return int(int(spend) * POINTS_PER_DOLLAR * {const}[tier])"]


def code_redeem_points(rng: random.Random) -> list[str]:
    fn = rng.choice(["redeem_points", "points_to_vouchers", "voucher_value", "convert_points"])
    block = rng.choice([100, 200, 250, 500])
    value = rng.choice([1, 2, 5, 10])
    return [f"def {fn}(points: int, block: int = {block}, value: float = {value}) -> tuple[float, int]:",
            *docstring(rng, "Return the voucher value for whole blocks of points and the points left over."),
            "    if points < 0:",
            "        raise ValueError(\"points must not be negative\")",
            "    blocks, left = divmod(points, block)",
            "    return blocks * value, left"]


def code_sku(rng: random.Random) -> list[str]:
    prefix_len = rng.choice([2, 3])
    digits = rng.choice([4, 5, 6])
    sep = rng.choice(["-", ""])
    fn = rng.choice(["is_valid_sku", "validate_sku", "check_sku", "sku_ok"])
    const = rng.choice(["SKU_RE", "SKU_PATTERN", "SKU_FORMAT"])
    example = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(prefix_len)) + sep + "".join(
        rng.choice("0123456789") for _ in range(digits))
    body = [f"    return bool({const}.fullmatch(sku.strip().upper()))"]
    if rng.random() < 0.5:
        body = ["    sku = sku.strip().upper()", f"    if not {const}.fullmatch(sku):", "        return False",
                "    return not sku.endswith(\"0\" * " + str(digits) + ")"]
    return ["import re", "", f"{const} = re.compile(r\"[A-Z]{{{prefix_len}}}{sep}\\d{{{digits}}}\")", "", "",
            f"def {fn}(sku: str) -> bool:",
            *docstring(rng, f"True for SKUs shaped like {example}."), *body]


def code_shoe_size(rng: random.Random) -> list[str]:
    fn = rng.choice(["us_to_eu", "convert_shoe_size", "eu_shoe_size", "shoe_size_eu"])
    offset = rng.choice([33, 33.5, 32.5])
    gender = rng.choice(["mens", "womens"])
    return [f"def {fn}(us_size: float) -> int:",
            *docstring(rng, f"Approximate EU size for a US {gender} shoe size."),
            "    if not 3 <= us_size <= 16:",
            "        raise ValueError(f\"size out of range: {us_size}\")",
            f"    return round(us_size + {offset})"]


def code_clothing_size(rng: random.Random) -> list[str]:
    fn = rng.choice(["letter_size", "size_for_chest", "chest_to_size", "recommend_size"])
    const = rng.choice(["CHEST_CM", "SIZE_CHART", "CHEST_SIZES"])
    start = rng.choice([84, 86, 88])
    step = rng.choice([4, 6])
    labels = ["XS", "S", "M", "L", "XL", "XXL"]
    chart = ", ".join(f"(\"{lab}\", {start + i * step})" for i, lab in enumerate(labels))
    return [f"{const} = [{chart}]", "", "",
            f"def {fn}(chest_cm: float) -> str:",
            *docstring(rng, "Smallest letter size whose chest measurement fits."),
            f"    for label, limit in {const}:",
            "        if chest_cm <= limit:",
            "            return label",
            f"    return {const}[-1][0]"]


def code_inventory_class(rng: random.Random) -> list[str]:
    cls = rng.choice(["Inventory", "StockLedger", "Warehouse", "StoreStock"])
    add = rng.choice(["add", "receive", "restock"])
    remove = rng.choice(["remove", "sell", "take"])
    return [f"class {cls}:",
            *docstring(rng, "Units on hand per SKU."),
            "    def __init__(self) -> None:",
            "        self.units: dict[str, int] = {}",
            "",
            f"    def {add}(self, sku: str, qty: int) -> None:",
            "        self.units[sku] = self.units.get(sku, 0) + qty",
            "",
            f"    def {remove}(self, sku: str, qty: int) -> None:",
            "        have = self.units.get(sku, 0)",
            "        if qty > have:",
            "            raise ValueError(f\"only {have} of {sku} in stock\")",
            "        self.units[sku] = have - qty",
            "",
            "    def in_stock(self, sku: str) -> bool:",
            "        return self.units.get(sku, 0) > 0"]


def code_low_stock(rng: random.Random) -> list[str]:
    fn = rng.choice(["low_stock", "needs_restock", "below_threshold", "restock_list"])
    threshold = rng.choice([3, 5, 10, 12, 20])
    return [f"def {fn}(stock: dict[str, int], threshold: int = {threshold}) -> list[str]:",
            *docstring(rng, "SKUs at or below the threshold, lowest stock first."),
            "    if threshold < 0:",
            "        raise ValueError(\"threshold must not be negative\")",
            "    low = [(qty, sku) for sku, qty in stock.items() if qty <= threshold]",
            "    return [sku for _, sku in sorted(low)]"]


def code_reorder(rng: random.Random) -> list[str]:
    fn = rng.choice(["reorder_quantity", "order_amount", "units_to_order", "replenish_qty"])
    safety = rng.choice([1.2, 1.25, 1.5])
    case = rng.choice([6, 10, 12, 24])
    return ["import math", "", "",
            f"def {fn}(on_hand: int, daily_sales: float, lead_days: int, case_size: int = {case}) -> int:",
            *docstring(rng, f"Units to order to cover the lead time with a {safety}x safety margin, in whole cases."),
            f"    needed = daily_sales * lead_days * {safety} - on_hand",
            "    if needed <= 0:",
            "        return 0",
            "    return math.ceil(needed / case_size) * case_size"]


def code_gift_card(rng: random.Random) -> list[str]:
    cls = rng.choice(["GiftCard", "StoredValueCard", "GiftVoucher"])
    low, high = rng.choice([(10, 500), (5, 250), (25, 1000)])
    return ["from dataclasses import dataclass", "", "", "@dataclass", f"class {cls}:",
            *docstring(rng, f"A gift card loaded with {low} to {high} dollars."),
            "    number: str",
            "    balance: float",
            "",
            "    def __post_init__(self) -> None:",
            f"        if not {low} <= self.balance <= {high}:",
            "            raise ValueError(\"invalid gift card amount\")",
            "",
            "    def spend(self, amount: float) -> float:",
            "        \"\"\"Take up to `amount` from the card; return what is still to pay.\"\"\"",
            "        used = min(amount, self.balance)",
            "        self.balance = round(self.balance - used, 2)",
            "        return round(amount - used, 2)"]


def code_multibuy(rng: random.Random) -> list[str]:
    buy, free = rng.choice([(2, 1), (3, 1), (4, 1), (1, 1)])
    fn = rng.choice([f"buy_{buy}_get_{free}", "multibuy_total", "promo_total", "bundle_price"])
    return [f"def {fn}(unit_price: float, qty: int, buy: int = {buy}, free: int = {free}) -> float:",
            *docstring(rng, f"Total for qty units when every {buy + free}th unit in a group is free."),
            "    group = buy + free",
            "    full_groups, rest = divmod(qty, group)",
            "    paid = full_groups * buy + min(rest, buy)",
            "    return round(paid * unit_price, 2)"]


def code_delivery_fee(rng: random.Random) -> list[str]:
    fn = rng.choice(["delivery_fee", "shipping_cost", "postage", "shipping_fee"])
    free_over = rng.choice([35, 50, 60, 75])
    std, exp = rng.choice([(3.99, 7.99), (4.95, 9.95), (5.0, 12.0)])
    return [f"def {fn}(subtotal: float, express: bool = False) -> float:",
            *docstring(rng, f"Standard delivery is free from {free_over}; express always costs {exp}."),
            "    if express:",
            f"        return {exp}",
            f"    return 0.0 if subtotal >= {free_over} else {std}"]


def code_return_window(rng: random.Random) -> list[str]:
    fn = rng.choice(["can_return", "is_returnable", "within_return_window", "return_allowed"])
    const = rng.choice(["RETURN_DAYS", "RETURN_WINDOW", "RETURN_POLICY"])
    c, e = rng.choice([(30, 14), (28, 14), (60, 30), (30, 30)])
    return ["from datetime import date", "", f"{const} = {{\"clothing\": {c}, \"shoes\": {c}, \"electronics\": {e}}}",
            "", "",
            f"def {fn}(category: str, bought: date, today: date | None = None) -> bool:",
            *docstring(rng, "Whether an item of this category bought on `bought` can still be returned."),
            f"    days = {const}.get(category)",
            "    if days is None:",
            "        return False",
            "    today = today or date.today()",
            "    return (today - bought).days <= days"]


def code_format_price(rng: random.Random) -> list[str]:
    fn = rng.choice(["format_price", "price_label", "show_price", "money"])
    symbol = rng.choice(["$", "€", "£"])
    return [f"def {fn}(cents: int, symbol: str = \"{symbol}\") -> str:",
            *docstring(rng, "Format an amount in cents as a price label, e.g. 1999 -> 19.99."),
            "    sign = \"-\" if cents < 0 else \"\"",
            "    whole, frac = divmod(abs(cents), 100)",
            "    return f\"{sign}{symbol}{whole:,}.{frac:02d}\""]


def code_coupon(rng: random.Random) -> list[str]:
    const = rng.choice(["COUPONS", "PROMO_CODES", "VOUCHERS"])
    codes = rng.sample([("WELCOME", 10), ("SPRING", 15), ("SAVE", 20), ("VIP", 25), ("STUDENT", 10),
                        ("SUMMER", 5)], 3)
    table = ", ".join(f"\"{c}{pct}\": ({pct}, {rng.choice([0, 20, 50, 100])})" for c, pct in codes)
    fn = rng.choice(["apply_coupon", "use_code", "redeem_coupon"])
    return [f"{const} = {{{table}}}  # code: (percent off, minimum spend)", "", "",
            f"def {fn}(code: str, subtotal: float) -> float:",
            *docstring(rng, "Subtotal after the coupon; unknown codes or a short spend change nothing."),
            f"    pct, minimum = {const}.get(code.upper(), (0, 0))",
            "    if subtotal < minimum:",
            "        return subtotal",
            "    return round(subtotal * (100 - pct) / 100, 2)"]


def code_receipt(rng: random.Random) -> list[str]:
    fn = rng.choice(["receipt_lines", "format_receipt", "print_receipt"])
    width = rng.choice([32, 36, 40])
    return [f"def {fn}(items: list[tuple[str, int, float]], width: int = {width}) -> str:",
            *docstring(rng, "A plain-text receipt: one line per (name, qty, price) and a total."),
            "    lines, total = [], 0.0",
            "    for name, qty, price in items:",
            "        cost = qty * price",
            "        total += cost",
            "        label = f\"{qty} x {name}\"",
            "        lines.append(f\"{label[: width - 10]:<{width - 10}}{cost:>10.2f}\")",
            "    lines.append(\"-\" * width)",
            "    lines.append(f\"{'TOTAL':<{width - 10}}{total:>10.2f}\")",
            "    return \"\\n\".join(lines)"]


def code_price_per_unit(rng: random.Random) -> list[str]:
    fn = rng.choice(["unit_price", "price_per_kg", "price_per_100g", "compare_price"])
    per = rng.choice([100, 1000])
    label = "100 g" if per == 100 else "kg"
    return [f"def {fn}(price: float, grams: float) -> float:",
            *docstring(rng, f"Shelf-label price per {label} for a pack of `grams`."),
            "    if grams <= 0:",
            "        raise ValueError(\"pack weight must be positive\")",
            f"    return round(price / grams * {per}, 2)"]


def code_markdown(rng: random.Random) -> list[str]:
    fn = rng.choice(["clearance_price", "markdown", "age_markdown", "stale_stock_price"])
    after, step, floor = rng.choice([(30, 10, 50), (45, 15, 40), (60, 20, 30), (90, 25, 25)])
    return [f"def {fn}(price: float, days_on_shelf: int) -> float:",
            *docstring(rng, f"Cut {step}% for every {after} days unsold, never below {floor}% of the price."),
            f"    cuts = days_on_shelf // {after}",
            f"    pct = min(cuts * {step}, {100 - floor})",
            "    return round(price * (100 - pct) / 100, 2)"]


CODE_TEMPLATES: list[CodeGen] = [
    code_percent_discount, code_tiered_discount, code_sales_tax, code_cart_total, code_points_earned,
    code_redeem_points, code_sku, code_shoe_size, code_clothing_size, code_inventory_class, code_low_stock,
    code_reorder, code_gift_card, code_multibuy, code_delivery_fee, code_return_window, code_format_price,
    code_coupon, code_receipt, code_price_per_unit, code_markdown,
]


def code_records(rng: random.Random, n: int) -> list[dict]:
    out: list[dict] = []
    seen: set[str] = set()
    while len(out) < n:
        text = "\n".join(rng.choice(CODE_TEMPLATES)(rng)) + "\n"
        if text in seen:
            continue
        compile(text, "<retail_code>", "exec")  # every record is valid Python
        if not 5 <= text.count("\n") <= 30:  # short templates keep their docstring
            continue
        seen.add(text)
        out.append({"text": text})
    return out


# ---- files ----------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_tiny_mistral(path: Path, texts: list[str]) -> None:
    """A byte-level BPE tokenizer trained on `texts`, and a tiny MistralConfig matching it (no weights)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MistralConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    config = MistralConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                           pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    config.save_pretrained(path)


def main() -> None:
    rng = random.Random(SEED)
    chats = chat_records(rng, N_CHAT)
    code = code_records(rng, N_CODE)
    write_jsonl(HERE / "retail_chat.jsonl", chats)
    write_jsonl(HERE / "retail_code.jsonl", code)
    # Each message as ChatML writes it between <|im_start|> and <|im_end|>, so the role names are learned.
    texts = [f"{m['role']}\n{m['content']}" for r in chats for m in r["messages"]] + [r["text"] for r in code]
    write_tiny_mistral(HERE / "tiny-mistral", texts)
    print(f"wrote {len(chats)} conversations, {len(code)} code records and tiny-mistral/ to {HERE}")


if __name__ == "__main__":
    main()
