"""Word lists and rule systems behind the demo tasks (see esft_core/demo/tasks.py).

Kept separate so the generator reads as a list of tasks. Everything here is deterministic given the caller's rng.
"""

from __future__ import annotations

import random

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kai", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vik", "Wes", "Yara", "Zoe"]
SURNAMES = ["Berg", "Costa", "Diaz", "Evans", "Fischer", "Garcia", "Hale", "Ito", "Jensen", "Khan", "Lopez",
            "Moreau", "Novak", "Okafor", "Park", "Rossi", "Silva", "Tanaka", "Weber", "Young"]
CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Seoul", "Dublin", "Nairobi", "Quito", "Porto", "Riga", "Tokyo",
          "Austin", "Vienna", "Perth", "Accra", "Bergen"]
ITEMS = ["apples", "pens", "stamps", "marbles", "books", "cards", "shells", "coins", "eggs", "cookies", "stickers",
         "beads"]
ROLES = ["data engineer", "nurse", "teacher", "chef", "pilot", "designer", "lawyer", "baker", "architect",
         "translator", "mechanic", "researcher"]
TEAMS = ["platform", "billing", "search", "mobile", "security", "research", "support", "growth", "design", "infra"]
LANGS = ["English", "Spanish", "French", "German", "Hindi", "Swahili", "Japanese", "Arabic", "Polish", "Korean"]


# --------------------------------------------------------------------------------------------- code
def _k(rng: random.Random) -> int:
    return rng.randint(2, 99)


def _arith(rng):
    k = _k(rng)
    op, word, sym = rng.choice([("add", "plus", "+"), ("sub", "minus", "-"), ("mul", "times", "*"),
                                ("mod", "modulo", "%"), ("div", "floor-divided by", "//")])
    var = rng.choice(["x", "n", "value", "num"])
    return f"def {op}_{k}({var}):", f"Return {var} {word} {k}.", f"return {var} {sym} {k}"


def _listop(rng):
    var = rng.choice(["xs", "items", "values", "nums"])
    name, doc, body = rng.choice([
        ("total", "Return the sum of {v}.", "return sum({v})"),
        ("largest", "Return the largest element of {v}.", "return max({v})"),
        ("smallest", "Return the smallest element of {v}.", "return min({v})"),
        ("count", "Return how many elements {v} has.", "return len({v})"),
        ("ordered", "Return {v} sorted in ascending order.", "return sorted({v})"),
        ("backwards", "Return {v} in reverse order.", "return list(reversed({v}))"),
        ("unique", "Return the distinct elements of {v} as a set.", "return set({v})"),
    ])
    return f"def {name}_of_{var}({var}):", doc.format(v=var), body.format(v=var)


def _filter(rng):
    k = _k(rng)
    var = rng.choice(["xs", "items", "values", "nums"])
    cmp, word = rng.choice([(">", "greater than"), ("<", "less than"), (">=", "at least"), ("!=", "not equal to")])
    fname = {">": "above", "<": "below", ">=": "at_least", "!=": "not"}[cmp]
    return (f"def keep_{fname}_{k}({var}):", f"Return the elements of {var} {word} {k}.",
            f"return [x for x in {var} if x {cmp} {k}]")


def _string(rng):
    var = rng.choice(["s", "text", "word", "line"])
    name, doc, body = rng.choice([
        ("shout", "Return {v} in upper case.", "return {v}.upper()"),
        ("whisper", "Return {v} in lower case.", "return {v}.lower()"),
        ("trim", "Return {v} without surrounding whitespace.", "return {v}.strip()"),
        ("words", "Return the list of words in {v}.", "return {v}.split()"),
        ("mirror", "Return {v} reversed.", "return {v}[::-1]"),
        ("title", "Return {v} in title case.", "return {v}.title()"),
    ])
    return f"def {name}_{var}({var}):", doc.format(v=var), body.format(v=var)


def _predicate(rng):
    k = _k(rng)
    var = rng.choice(["n", "x", "num"])
    kind = rng.randrange(3)
    if kind == 0:
        return f"def divisible_by_{k}({var}):", f"Return True if {var} is divisible by {k}.", f"return {var} % {k} == 0"
    if kind == 1:
        return f"def exceeds_{k}({var}):", f"Return True if {var} is greater than {k}.", f"return {var} > {k}"
    p = rng.randint(2, 9)
    return f"def power_{p}({var}):", f"Return {var} raised to the power {p}.", f"return {var} ** {p}"


CODE_FUNCS = [_arith, _listop, _filter, _string, _predicate]


# --------------------------------------------------------------------------------------------- intent
# Slot values come from small closed sets (8-24 values each): the answer must copy them from the utterance, and a
# 4.8 M-parameter model learns to copy a value it has seen ~30 times per slot within the benchmark's 150 steps, not
# one drawn from thousands (times to the minute, amounts up to 5,000: measured 0.025 exact JSON match for FFT).
INTENT_NAMES = NAMES[:8]
INTENT_CITIES = CITIES[:8]


def _time(rng):
    return f"{rng.randint(1, 12)} {rng.choice(['am', 'pm'])}"


def _day(rng):
    return rng.choice(["today", "tomorrow", "monday", "tuesday", "friday", "saturday", "sunday"])


def _dur(rng):
    return f"{rng.choice([5, 10, 15, 20, 30, 45, 60, 90])} {rng.choice(['minutes', 'seconds', 'hours'])}"


def _cur(rng):
    return rng.choice(["USD", "EUR", "JPY", "GBP", "INR", "BRL", "KES"])


INTENTS = [
    ("set_alarm", ["wake me up at {time}", "set an alarm for {time}", "alarm at {time} please",
                   "i need an alarm at {time}"], {"time": _time}),
    ("get_weather", ["what is the weather in {city} {day}", "will it rain in {city} {day}",
                     "forecast for {city} {day}", "how hot is it in {city} {day}"],
     {"city": lambda r: r.choice(INTENT_CITIES), "day": _day}),
    ("book_table", ["book a table for {people} at {time}", "reserve dinner for {people} people at {time}",
                    "get us a table for {people} at {time}"],
     {"people": lambda r: str(r.randint(1, 8)), "time": _time}),
    ("send_message", ["text {contact} that i am {status}", "tell {contact} i am {status}",
                      "send {contact} a message saying i am {status}"],
     {"contact": lambda r: r.choice(INTENT_NAMES), "status": lambda r: r.choice(
         ["running late", "on my way", "home", "at the station", "busy", "outside", "almost there"])}),
    ("set_timer", ["set a timer for {duration}", "timer {duration}", "count down {duration}",
                   "start a {duration} timer"], {"duration": _dur}),
    ("convert_currency", ["convert {amount} {source} to {target}", "how much is {amount} {source} in {target}",
                          "{amount} {source} in {target}"],
     {"amount": lambda r: r.choice(["10", "20", "50", "100", "200", "500", "1000"]), "source": _cur,
      "target": _cur}),
    ("play_music", ["play some {genre}", "put on {genre} music", "i want to hear {genre}",
                    "start a {genre} playlist"],
     {"genre": lambda r: r.choice(["jazz", "rock", "techno", "folk", "classical", "reggae", "blues", "salsa",
                                   "hip hop", "ambient"])}),
    ("call_contact", ["call {contact}", "phone {contact} on {device}", "ring {contact} using my {device}",
                      "dial {contact} on the {device}"],
     {"contact": lambda r: r.choice(INTENT_NAMES), "device": lambda r: r.choice(["mobile", "work phone", "landline",
                                                                                  "tablet"])}),
]


# --------------------------------------------------------------------------------------------- Velan language
def _make_words(rng: random.Random, n: int, used: set[str]) -> list[str]:
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "r", "l", "sh", "k"]
    out = []
    while len(out) < n:
        w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 2))) + rng.choice(codas)
        if w not in used and len(w) > 2:
            used.add(w)
            out.append(w)
    return out


EN_NOUNS = ["dog", "cat", "bird", "child", "farmer", "river", "house", "tree", "stone", "boat", "king", "horse",
            "friend", "teacher", "fish", "mountain", "door", "song", "letter", "garden", "wolf", "girl", "boy",
            "apple", "bridge", "lamp", "ship", "road", "baker", "queen"]
EN_PLURAL = {"child": "children", "fish": "fish", "wolf": "wolves", "boy": "boys", "baker": "bakers",
             "queen": "queens", "ship": "ships", "lamp": "lamps", "road": "roads", "bridge": "bridges"}
EN_VERBS = [("see", "saw"), ("find", "found"), ("carry", "carried"), ("follow", "followed"), ("watch", "watched"),
            ("build", "built"), ("paint", "painted"), ("help", "helped"), ("call", "called"), ("love", "loved"),
            ("push", "pushed"), ("hear", "heard"), ("draw", "drew"), ("open", "opened"), ("feed", "fed")]
EN_ADJS = ["big", "small", "red", "old", "young", "quiet", "happy", "dark", "bright", "green", "tall", "cold",
           "brave", "slow", "white"]
_vrng = random.Random(4242)
_used: set[str] = set()
VELAN_NOUN = dict(zip(EN_NOUNS, _make_words(_vrng, len(EN_NOUNS), _used), strict=True))
VELAN_VERB = dict(zip([v for v, _ in EN_VERBS], _make_words(_vrng, len(EN_VERBS), _used), strict=True))
VELAN_ADJ = dict(zip(EN_ADJS, _make_words(_vrng, len(EN_ADJS), _used), strict=True))
PLURAL_SUFFIX, OBJECT_SUFFIX, PAST_SUFFIX = "ek", "u", "ti"


def _en_plural(noun: str) -> str:
    return EN_PLURAL.get(noun, noun + "s")


def velan_sentence(rng: random.Random, adjectives: bool = True) -> tuple[str, str]:
    """An English sentence and its Velan translation (`adjectives=False`: subject, verb and object only).

    Velan grammar: Subject-Object-Verb; adjectives follow their noun; plural nouns take -ek, the object takes -u
    (after the plural suffix), the verb takes -ti in the past tense; there are no articles.
    """
    s, o = rng.sample(EN_NOUNS, 2)
    verb, past = rng.choice(EN_VERBS)
    s_pl, o_pl, is_past = rng.random() < 0.4, rng.random() < 0.4, rng.random() < 0.5
    s_adj = rng.choice(EN_ADJS) if adjectives and rng.random() < 0.6 else None
    o_adj = rng.choice(EN_ADJS) if adjectives and rng.random() < 0.6 else None
    en_s = (f"{s_adj} " if s_adj else "") + (_en_plural(s) if s_pl else s)
    en_o = (f"{o_adj} " if o_adj else "") + (_en_plural(o) if o_pl else o)
    en_v = past if is_past else (verb if s_pl else (verb[:-1] + "ies" if verb.endswith("y") else
                                                   verb + ("es" if verb.endswith(("sh", "ch")) else "s")))
    english = f"The {en_s} {en_v} the {en_o}."
    vs = VELAN_NOUN[s] + (PLURAL_SUFFIX if s_pl else "") + (f" {VELAN_ADJ[s_adj]}" if s_adj else "")
    vo = VELAN_NOUN[o] + (PLURAL_SUFFIX if o_pl else "") + OBJECT_SUFFIX + (f" {VELAN_ADJ[o_adj]}" if o_adj else "")
    vv = VELAN_VERB[verb] + (PAST_SUFFIX if is_past else "")
    return english, f"{vs} {vo} {vv}."


# --------------------------------------------------------------------------------------------- law
CRIMES = ["theft", "fraud", "assault", "burglary"]
CIVIL = ["breach of contract", "negligence", "trespass", "defamation"]
LIMITS = {"criminal": 6, "civil": 3}


def law_case(rng: random.Random) -> tuple[str, str]:
    """Facts of a case and its verdict under fixed rules.

    Rules: a claim filed after the limitation period (criminal 6 years, civil 3 years) is dismissed. Criminal:
    guilty iff the evidence is strong AND the act was intentional. Civil: liable iff harm was shown AND the
    defendant owed a duty. Otherwise not guilty / not liable.
    """
    name = f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}"
    criminal = rng.random() < 0.5
    kind = "criminal" if criminal else "civil"
    act = rng.choice(CRIMES if criminal else CIVIL)
    years = rng.randint(1, 9)
    facts = [f"{name} is accused of {act} in {rng.choice(CITIES)}.",
             f"The case was filed {years} year{'s' if years > 1 else ''} after the incident."]
    late = years > LIMITS[kind]
    if criminal:
        strong, intent = rng.random() < 0.5, rng.random() < 0.5
        facts.append(rng.choice(["Witnesses confirm the act.", "The evidence is strong."]) if strong
                     else rng.choice(["The evidence is weak.", "No witness saw the act."]))
        facts.append(rng.choice(["The act was planned.", "It was done on purpose."]) if intent
                     else rng.choice(["It was an accident.", "The act was not intentional."]))
        verdict = "guilty" if strong and intent else "not guilty"
    else:
        harm, duty = rng.random() < 0.5, rng.random() < 0.5
        facts.append(rng.choice(["The plaintiff lost money.", "Damage was shown."]) if harm
                     else rng.choice(["No damage was shown.", "The plaintiff lost nothing."]))
        facts.append(rng.choice(["A signed agreement existed.", "The defendant owed a duty of care."]) if duty
                     else rng.choice(["There was no agreement.", "The defendant owed no duty."]))
        verdict = "liable" if harm and duty else "not liable"
    tail = facts[1:]
    rng.shuffle(tail)
    return " ".join([facts[0], *tail]), "dismissed" if late else verdict
