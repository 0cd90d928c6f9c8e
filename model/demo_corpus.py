"""The demo corpus: a small bilingual world of true, checkable facts, written in the real datasets' formats.

Countries (capital, continent), arithmetic, the calendar, units and everyday science are stated in several
phrasings in the pretraining prose. SFT asks and answers them for most countries; a held-out set of countries
is never answered in SFT, so chat accuracy on their capitals shows whether fine-tuning unlocked knowledge that
only pretraining taught. Everything is seeded and deterministic.
"""
import csv
import json
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_writer

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_MARKER = ".minimind_demo"  # in every --out_dir demo.py makes: the only kind of folder it replaces
CONTINENT_ZH = {"Asia": "亚洲", "Europe": "欧洲", "Africa": "非洲", "North America": "北美洲",
                "South America": "南美洲", "Oceania": "大洋洲"}


@dataclass(frozen=True)
class Country:
    name: str
    name_zh: str
    capital: str
    capital_zh: str
    continent: str

    @property
    def continent_zh(self):
        return CONTINENT_ZH[self.continent]


def load_countries() -> list[Country]:
    with open(DATA_DIR / "countries.tsv", encoding="utf-8") as f:
        return [Country(**row) for row in csv.DictReader(f, delimiter="\t")]


class EntityFinder:
    """Names of countries and capitals found in a text, longest name first at each position.

    "罗马尼亚" (Romania) is one country, not the capital "罗马" (Rome) plus "尼亚"; "科威特城" (Kuwait City)
    is a capital, not the country "科威特" plus "城".
    """

    def __init__(self, countries=None):
        countries = countries or load_countries()
        self.kind = {}
        for c in countries:
            self.kind.update({c.name: "country", c.name_zh: "country", c.capital: "capital", c.capital_zh: "capital"})
        names = sorted(self.kind, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, names)))

    def names(self, text: str, kind: str) -> list[str]:
        """The names of `kind` ("country" or "capital") in `text`, in order."""
        return [m.group() for m in self.pattern.finditer(text) if self.kind[m.group()] == kind]

    def capitals(self, text: str) -> list[str]:
        return self.names(text, "capital")

    def exact_match(self, response: str, answer: str) -> bool:
        """A hit names exactly one capital (any number of times), and it is the right one."""
        return set(self.capitals(response)) == {answer}


# ------------------------------------------------------------------------------------------------ phrasings
CAPITAL_EN = [
    "The capital of {c} is {cap}.", "{cap} is the capital of {c}.", "The capital city of {c} is {cap}.",
    "What is the capital of {c}? The capital of {c} is {cap}.",
    "What is the capital city of {c}? The capital of {c} is {cap}.",
    "Which city is the capital of {c}? The capital of {c} is {cap}.",
    "Tell me the capital of {c}. The capital of {c} is {cap}.",
    "Do you know the capital of {c}? The capital of {c} is {cap}.",
]
# Some phrasings are a question followed by an answer that restates its subject, as FAQ pages do. That habit
# (restate "X" after a question about X) is what a chat answer needs: a Chinese answer starts with the country's
# name, copied from the question, where an English one copies it after "The capital of". With two such Chinese
# phrasings, held-out Chinese accuracy after SFT was 100 / 96 / 48% on seeds 42 / 7 / 123 (seed 123's answers
# named a country SFT had trained on); with four (one per SFT question form), seed 123 got 100%. English got the
# same, five FAQ phrasings for its five question forms: sampled answers of seed 7 rose from 79% to 94% (greedy 94%).
CAPITAL_ZH = [
    "{c}的首都是{cap}。", "{cap}是{c}的首都。", "{c}的首都为{cap}。", "{c}的首都是什么？{c}的首都是{cap}。",
    "请告诉我{c}的首都。{c}的首都是{cap}。", "说到{c}，{c}的首都是{cap}。",
    "{c}的首都是哪里？{c}的首都是{cap}。", "{c}的首都是哪座城市？{c}的首都是{cap}。",
]
# The last three of each: FAQs that end in SFT's answer form, as for the capitals. What GRPO sharpens, pretraining
# must have stored: with two statements and no FAQ it could not lift held-out continents past 77%, and with one FAQ
# a seed could still pretrain with a third of the English continents wrong (docs/demo.md).
CONTINENT_EN = ["{c} is a country in {cont}.", "{cap}, the capital of {c}, is a city in {cont}.",
                "Where is {c}? The country {c} is in {cont}.", "On which continent is {c}? The country {c} is in {cont}.",
                "Which continent is {c} in? The country {c} is in {cont}."]
CONTINENT_ZH_T = ["{c}位于{cont}。", "{c}的首都{cap}是{cont}的一座城市。", "{c}在哪里？{c}位于{cont}。",
                  "{c}在哪个大洲？{c}位于{cont}。", "{c}位于哪个大洲？{c}位于{cont}。"]
DAYS = [("Monday", "星期一"), ("Tuesday", "星期二"), ("Wednesday", "星期三"), ("Thursday", "星期四"),
        ("Friday", "星期五"), ("Saturday", "星期六"), ("Sunday", "星期日")]
MONTHS = [("January", "一月"), ("February", "二月"), ("March", "三月"), ("April", "四月"), ("May", "五月"),
          ("June", "六月"), ("July", "七月"), ("August", "八月"), ("September", "九月"), ("October", "十月"),
          ("November", "十一月"), ("December", "十二月")]
# (English statements, Chinese statements, English question, English answer, Chinese question, Chinese answer)
GENERAL_FACTS = [
    (["Water boils at 100 degrees Celsius at sea level.", "At sea level, water boils at 100 degrees Celsius."],
     ["在海平面上，水的沸点是100摄氏度。", "水在海平面上100摄氏度时沸腾。"],
     "At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius at sea level.",
     "水在海平面上的沸点是多少？", "水在海平面上的沸点是100摄氏度。"),
    (["Water freezes at 0 degrees Celsius.", "At 0 degrees Celsius, water turns into ice."],
     ["水在0摄氏度时结冰。", "水的冰点是0摄氏度。"],
     "At what temperature does water freeze?", "Water freezes at 0 degrees Celsius.",
     "水在多少度结冰？", "水在0摄氏度时结冰。"),
    (["The Earth orbits the Sun.", "It takes the Earth about 365 days to go around the Sun."],
     ["地球绕着太阳转。", "地球绕太阳一周大约需要365天。"],
     "What does the Earth orbit?", "The Earth orbits the Sun.", "地球绕着什么转？", "地球绕着太阳转。"),
    (["The Moon orbits the Earth.", "The Moon is the natural satellite of the Earth."],
     ["月球绕着地球转。", "月球是地球的天然卫星。"],
     "What is the natural satellite of the Earth?", "The Moon is the natural satellite of the Earth.",
     "地球的天然卫星是什么？", "月球是地球的天然卫星。"),
    (["The Sun is a star.", "The Sun is the star at the center of our solar system."],
     ["太阳是一颗恒星。", "太阳是太阳系中心的恒星。"],
     "Is the Sun a planet or a star?", "The Sun is a star.", "太阳是行星还是恒星？", "太阳是一颗恒星。"),
    (["Plants take in carbon dioxide and give off oxygen.", "Green plants make food from sunlight."],
     ["植物吸收二氧化碳，释放氧气。", "绿色植物利用阳光制造养分。"],
     "What gas do plants give off?", "Plants give off oxygen.", "植物释放什么气体？", "植物释放氧气。"),
    (["A week has seven days.", "There are seven days in a week."], ["一周有七天。", "一个星期有七天。"],
     "How many days are there in a week?", "There are seven days in a week.", "一周有几天？", "一周有七天。"),
    (["A year has twelve months.", "There are twelve months in a year."], ["一年有十二个月。", "一年共有十二个月。"],
     "How many months are there in a year?", "There are twelve months in a year.", "一年有几个月？", "一年有十二个月。"),
    (["A day has 24 hours.", "There are 24 hours in a day."], ["一天有24小时。", "一天共有24个小时。"],
     "How many hours are there in a day?", "There are 24 hours in a day.", "一天有多少小时？", "一天有24小时。"),
    (["An hour has 60 minutes.", "There are 60 minutes in an hour."], ["一小时有60分钟。", "一个小时等于60分钟。"],
     "How many minutes are there in an hour?", "There are 60 minutes in an hour.", "一小时有多少分钟？", "一小时有60分钟。"),
    (["A kilometer is 1000 meters.", "One kilometer equals 1000 meters."], ["一千米等于1000米。", "1千米是1000米。"],
     "How many meters are in a kilometer?", "A kilometer is 1000 meters.", "一千米等于多少米？", "一千米等于1000米。"),
    (["A kilogram is 1000 grams.", "One kilogram equals 1000 grams."], ["一千克等于1000克。", "1千克是1000克。"],
     "How many grams are in a kilogram?", "A kilogram is 1000 grams.", "一千克等于多少克？", "一千克等于1000克。"),
    (["A meter is 100 centimeters.", "One meter equals 100 centimeters."], ["一米等于100厘米。", "1米是100厘米。"],
     "How many centimeters are in a meter?", "A meter is 100 centimeters.", "一米等于多少厘米？", "一米等于100厘米。"),
    (["The highest mountain in the world is Mount Everest.", "Mount Everest is the highest mountain on Earth."],
     ["世界上最高的山峰是珠穆朗玛峰。", "珠穆朗玛峰是地球上最高的山。"],
     "What is the highest mountain in the world?", "The highest mountain in the world is Mount Everest.",
     "世界上最高的山是什么？", "世界上最高的山是珠穆朗玛峰。"),
    (["The giant panda mainly eats bamboo.", "Bamboo is the main food of the giant panda."],
     ["大熊猫主要吃竹子。", "竹子是大熊猫的主要食物。"],
     "What is the main food of the giant panda?", "The giant panda mainly eats bamboo.",
     "大熊猫的主要食物是什么？", "大熊猫主要吃竹子。"),
]
IDENTITY = [("Who are you?", "I am MiniMind, a small language model trained from scratch."),
            ("你是谁？", "我是MiniMind，一个从零开始训练的小型语言模型。")]
# Pretraining states who MiniMind is too, in the first person as well: a token only SFT uses keeps its random
# embedding (SFT freezes the embeddings), and the SFT model gave "我" 2% and answered "你是谁？" with a broken
# character 7 times in 8 as soon as it sampled.
IDENTITY_EN = ["MiniMind is a small language model trained from scratch.",
               "A small language model called MiniMind was trained from scratch.",
               "MiniMind says: I am MiniMind, a small language model trained from scratch."]
IDENTITY_ZH = ["MiniMind是一个从零开始训练的小型语言模型。", "小型语言模型MiniMind是从零开始训练的。",
               "MiniMind说：我是MiniMind，一个从零开始训练的小型语言模型。"]
QUESTION_EN = ["What is the capital of {c}?", "What is the capital city of {c}?", "Which city is the capital of {c}?",
               "Tell me the capital of {c}.", "Do you know the capital of {c}?"]
QUESTION_ZH = ["{c}的首都是哪里？", "{c}的首都是哪座城市？", "{c}的首都是什么？", "请告诉我{c}的首都。"]
CONTINENT_Q_EN, CONTINENT_Q_ZH = "Which continent is {c} in?", "{c}位于哪个大洲？"


def capital_answer(country: Country, lang: str) -> str:
    """The SFT answer form: the pretraining sentence itself, so that the answer continues what pretraining
    taught ("The capital of X is" -> Y). Measured on the demo: full sentences beat short answers in Chinese
    too (60% vs 38% held-out with the same training)."""
    if lang == "en":
        return f"The capital of {country.name} is {country.capital}."
    return f"{country.name_zh}的首都是{country.capital_zh}。"


def continent_answer(country: Country, lang: str) -> str:
    """The English answer restates the name after a space, as the question has it: opening the line, "Algeria" is
    "A"+"l"+"g"+"eria", nothing like the question's " Algeria", and the model wrote another country's name."""
    if lang == "en":
        return f"The country {country.name} is in {country.continent}."
    return f"{country.name_zh}位于{country.continent_zh}。"


def fill(template: str, country: Country, lang: str) -> str:
    if lang == "en":
        return template.format(c=country.name, cap=country.capital, cont=country.continent)
    return template.format(c=country.name_zh, cap=country.capital_zh, cont=country.continent_zh)


def population(country: Country) -> int:
    """The demo world's census: an invented population per country, stated in no text of the corpus, so that only
    the lookup tool knows it (model/tools.py) and a model can answer only by calling it."""
    return (zlib.crc32(country.name.encode()) % 9_000 + 100) * 10_000


# Tool-call answers: the question's numbers, or the tool's result, copied into a sentence.
CALC_Q = {("en", "+"): "What is {a} plus {b}?", ("zh", "+"): "{a}加{b}等于多少？",
          ("en", "*"): "What is {a} times {b}?", ("zh", "*"): "{a}乘以{b}等于多少？"}
CALC_A = {("en", "+"): "{a} plus {b} equals {v}.", ("zh", "+"): "{a}加{b}等于{v}。",
          ("en", "*"): "{a} times {b} equals {v}.", ("zh", "*"): "{a}乘以{b}等于{v}。"}
POPULATION_Q = {"en": "What is the population of {c}?", "zh": "{c}有多少人口？"}
POPULATION_A = {"en": "The population of {c} is {v}.", "zh": "{c}的人口是{v}。"}


# Recall passages: a few people each write down one thing (a number or a country), then one of them is asked back.
# Nothing but the passage can say what comes after the question, so the only way to predict it is to copy the
# span from the context: the skill a tool call needs (the question's numbers or country into the call's JSON).
RECALL_PEOPLE = {"en": ["Anna", "Tom", "Lily", "Sam", "Mia", "Ben", "Leo", "Eva"],
                 "zh": ["小明", "小红", "小华", "小丽", "小刚", "小芳", "小军", "小英"]}
RECALL_NOTE = {"en": "{who} wrote down {x}.", "zh": "{who}写下了{x}。"}
RECALL_ASK = {"en": "What did {who} write down? {who} wrote down", "zh": "{who}写下了什么？{who}写下了"}
RECALL_END = {"en": ".", "zh": "。"}


def recall_passage(countries, lang: str, rng: random.Random) -> tuple[str, str]:
    """(the passage up to the asked span, the span): 2-4 notes, each a fresh 2-7 digit number or a country."""
    people = rng.sample(RECALL_PEOPLE[lang], rng.randint(2, 4))
    items = []
    for c in rng.sample(countries, len(people)):
        k = rng.randint(2, 7)  # digits, if this note is a number
        items.append(str(rng.randint(10 ** (k - 1), 10 ** k - 1)) if rng.random() < 0.5 else
                     (c.name if lang == "en" else c.name_zh))
    sep = " " if lang == "en" else ""
    asked = rng.randrange(len(people))
    notes = sep.join(RECALL_NOTE[lang].format(who=who, x=x) for who, x in zip(people, items))
    return notes + sep + RECALL_ASK[lang].format(who=people[asked]), items[asked]


def calc_operands(op: str, rng: random.Random) -> tuple[int, int]:
    return (rng.randint(100, 9999), rng.randint(100, 9999)) if op == "+" else (rng.randint(10, 999), rng.randint(2, 99))


# ------------------------------------------------------------------------------------------------- the world
class DemoWorld:
    def __init__(self, seed: int = 42, held_out: int = 48):
        self.seed = seed
        countries = load_countries()
        rng = random.Random(seed)
        order = countries[:]
        rng.shuffle(order)
        self.held_out = sorted(order[:held_out], key=lambda c: c.name)
        self.train = sorted(order[held_out:], key=lambda c: c.name)
        self.countries = countries
        # One-digit sums that SFT may ask (it asks 40 of these 70 ordered pairs).
        pairs = [(a, b) for a in range(10) for b in range(10)]
        rng.shuffle(pairs)
        self.sums_train = sorted(pairs[30:])

    # -- pretraining prose
    def sentences(self, lang: str) -> list[str]:
        caps = CAPITAL_EN if lang == "en" else CAPITAL_ZH
        conts = CONTINENT_EN if lang == "en" else CONTINENT_ZH_T
        out = [fill(t, c, lang) for c in self.countries for t in caps + conts]
        for a in range(10):
            for b in range(a, 10):  # addition commutes: one order per pair
                out.append(f"{a} plus {b} equals {a + b}." if lang == "en" else f"{a}加{b}等于{a + b}。")
        for seq, unit, unit_zh in ((DAYS, "day", "后一天"), (MONTHS, "month", "下一个月")):
            for (en, zh), (next_en, next_zh) in zip(seq, seq[1:] + seq[:1]):
                out.append(f"The {unit} after {en} is {next_en}." if lang == "en" else f"{zh}的{unit_zh}是{next_zh}。")
        for en_list, zh_list, *_ in GENERAL_FACTS:
            out.extend(en_list if lang == "en" else zh_list)
        out.extend(IDENTITY_EN if lang == "en" else IDENTITY_ZH)
        return out

    def pretrain_documents(self, repeats: int, rng: random.Random):
        """Sentences shuffled into single-language documents of 3-8 sentences, regrouped for each repeat."""
        for _ in range(repeats):
            docs = []
            for lang in ("en", "zh"):
                pool = self.sentences(lang)
                rng.shuffle(pool)
                sep = " " if lang == "en" else ""
                i = 0
                while i < len(pool):
                    n = rng.randint(3, 8)
                    docs.append(sep.join(pool[i:i + n]))
                    i += n
            rng.shuffle(docs)
            yield from docs

    # -- chat data
    def qa_pairs(self, countries, rng):
        """(question, answer) pairs about countries and general facts."""
        pairs = []
        for c in countries:
            for lang, templates in (("en", QUESTION_EN), ("zh", QUESTION_ZH)):
                for t in rng.sample(templates, 2):
                    pairs.append((fill(t, c, lang), capital_answer(c, lang)))
                q = CONTINENT_Q_EN if lang == "en" else CONTINENT_Q_ZH
                pairs.append((fill(q, c, lang), continent_answer(c, lang)))
        for _, _, qen, aen, qzh, azh in GENERAL_FACTS:  # few facts, so each is asked several times
            pairs += [(qen, aen), (qzh, azh)] * 4
        for a, b in rng.sample(self.sums_train, 40):
            pairs += [(f"What is {a} plus {b}?", f"{a} plus {b} equals {a + b}."), (f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。")]
        pairs += IDENTITY * 10
        return pairs

    def sft_rows(self, rng: random.Random, multi_turn_fraction: float = 0.2):
        """Rows in the deepctrl format: id, instruction, input, output, history [[q, a], ...].

        (Multiple-choice rows answered with a letter were tried and dropped: the demo model learned a letter
        prior, not the matching, and C-Eval-format accuracy fell from 25% to 18%.)
        """
        pairs = self.qa_pairs(self.train, rng)
        rng.shuffle(pairs)
        rows = []
        for i, (q, a) in enumerate(pairs):
            history = []
            if rng.random() < multi_turn_fraction:
                history = [list(p) for p in rng.sample(pairs, rng.randint(1, 2))]
            rows.append({"id": f"demo-sft-{i}", "instruction": q, "input": "", "output": a, "history": history})
        return rows

    # -- tools (model/tools.py): calls the model cannot replace by memory
    @staticmethod
    def tool_call(lang: str, op: str | None, a=None, b=None, country: Country | None = None):
        """(the call, its result, the final answer) of a calculator (op + or *) or population question."""
        from .tools import calculator, lookup

        if op:
            expression = f"{a}{op}{b}"
            call = {"name": "calculator", "arguments": {"expression": expression}}
            value = calculator(expression)
            return call, value, CALC_A[lang, op].format(a=a, b=b, v=value)
        name = country.name if lang == "en" else country.name_zh
        call = {"name": "lookup", "arguments": {"country": name, "field": "population"}}
        value = lookup(name, "population")
        return call, value, POPULATION_A[lang].format(c=name, v=value)

    def tool_questions(self, countries, rng, per_language: int, calc_share: float = 0.5):
        """[{"lang", "question", "call", "result", "answer"}]: calculator sums and products with fresh numbers, and
        the populations of `countries`, in both languages."""
        rows = []
        for lang in ("en", "zh"):
            calc = round(per_language * calc_share)
            for i in range(calc):
                op = "+" if i % 3 else "*"
                a, b = calc_operands(op, rng)
                call, value, answer = self.tool_call(lang, op, a, b)
                rows.append({"lang": lang, "question": CALC_Q[lang, op].format(a=a, b=b), "call": call,
                             "result": value, "answer": answer})
            for c in rng.sample(countries, min(per_language - calc, len(countries))):
                call, value, answer = self.tool_call(lang, None, country=c)
                rows.append({"lang": lang, "question": POPULATION_Q[lang].format(c=c.name if lang == "en" else c.name_zh),
                             "call": call, "result": value, "answer": answer})
        return rows

    def tool_sft_rows(self, rng, per_language: int = 150):
        """SFT conversations in upstream's tool format: the tools on the row, the assistant's call, the tool's
        result, the answer in a sentence. Populations of the SFT countries only."""
        from .tools import DEMO_TOOLS

        rows = []
        for i, q in enumerate(self.tool_questions(self.train, rng, per_language)):
            rows.append({"id": f"demo-tool-{i}", "tools": DEMO_TOOLS, "messages": [
                {"role": "user", "content": q["question"]},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": q["call"]}]},
                {"role": "tool", "content": q["result"]},
                {"role": "assistant", "content": q["answer"]}]})
        return rows

    # -- copying from context (issue 34): pretraining text that rewards it, and the probe that measures it
    def copy_documents(self, rng: random.Random, passages: int, tool_transcripts_per_language: int) -> list[str]:
        """Recall passages about the SFT countries and fresh numbers, and tool transcripts with fresh numbers, as
        pretraining text."""
        docs = []
        for _ in range(passages):
            lang = rng.choice(("en", "zh"))
            prompt, span = recall_passage(self.train, lang, rng)
            docs.append(f"{prompt}{' ' if lang == 'en' else ''}{span}{RECALL_END[lang]}")
        docs += [tool_text(r) for r in self.tool_sft_rows(rng, tool_transcripts_per_language)]
        rng.shuffle(docs)
        return docs

    def copy_probe(self, rng: random.Random, per_language: int = 32) -> list[dict]:
        """Held-out recall passages: countries no recall passage names, numbers drawn afresh. [{"lang", "prompt",
        "answer"}]: the right continuation is the answer, then the sentence's end."""
        rows = []
        for lang in ("en", "zh"):
            for _ in range(per_language):
                prompt, span = recall_passage(self.held_out, lang, rng)
                rows.append({"lang": lang, "prompt": prompt, "answer": span})
        return rows

    # -- GRPO: which continent a country is in. SFT asks it, yet the SFT model mostly names another country
    # ("Slovakia is in Asia.") or answers with the capital: a skill left half done, checked by a program.
    def continent_prompts(self, countries):
        return [{"prompt": fill(CONTINENT_Q_EN if lang == "en" else CONTINENT_Q_ZH, c, lang), "lang": lang,
                 "answer": c.continent if lang == "en" else c.continent_zh,
                 "subject": c.name if lang == "en" else c.name_zh} for c in countries for lang in ("en", "zh")]

    def keep_prompts(self, countries, identity_repeats: int = 8):
        """GRPO's other prompts: the skills RL must not erase, each scored by the same reward. The capital questions
        (one question form per country, in turn), and the identity questions, repeated so that a batch meets one
        every few steps. Trained on continents alone, one CPU's GRPO model answered every English question
        "<something> is in <continent>." (`../shared/notes/rl-forgetting.md`)."""
        rows = []
        for i, c in enumerate(countries):
            for lang, templates in (("en", QUESTION_EN), ("zh", QUESTION_ZH)):
                rows.append({"prompt": fill(templates[i % len(templates)], c, lang), "lang": lang,
                             "answer": c.capital if lang == "en" else c.capital_zh,
                             "subject": c.name if lang == "en" else c.name_zh})
        for (question, answer), lang in zip(IDENTITY, ("en", "zh")):
            rows += [{"prompt": question, "lang": lang, "answer": answer, "subject": None}] * identity_repeats
        return rows

    def held_out_questions(self):
        """The measuring stick: capitals of countries whose facts only pretraining has seen."""
        rows = []
        for c in self.held_out:
            rows.append({"lang": "en", "country": c.name, "question": fill(QUESTION_EN[0], c, "en"), "answer": c.capital})
            rows.append({"lang": "zh", "country": c.name_zh, "question": fill(QUESTION_ZH[0], c, "zh"),
                         "answer": c.capital_zh})
        return rows

    def dpo_rows(self, countries, rng, balanced: bool = False):
        """Chosen: the true capital. Rejected: a plausible wrong one, another capital of the same continent.

        `balanced` (the training pairs): the rejected capitals are the same countries' own, one step round a
        shuffled cycle per continent, so each capital is rejected as often as it is chosen and DPO can only learn
        which capital goes with which country. Drawn at random instead, capitals that were rejected more often
        than chosen were pushed down whatever the question, held-out reward accuracy stopped at 84% and held-out
        capitals named in training as wrong answers lost probability as right ones.
        """
        rows = []
        for lang, templates in (("en", QUESTION_EN), ("zh", QUESTION_ZH)):
            if balanced:
                wrong = {}
                for continent in CONTINENT_ZH:
                    cycle = [c for c in countries if c.continent == continent]
                    rng.shuffle(cycle)
                    if len(cycle) > 1:
                        wrong.update({c: cycle[(i + 1) % len(cycle)] for i, c in enumerate(cycle)})
            for c in countries:
                if balanced and c in wrong:
                    other = wrong[c]
                else:
                    other = rng.choice([o for o in self.countries if o.continent == c.continent and o != c])
                fake = Country(c.name, c.name_zh, other.capital, other.capital_zh, c.continent)
                rows.append({"prompt": fill(rng.choice(templates), c, lang), "chosen": capital_answer(c, lang),
                             "rejected": capital_answer(fake, lang)})
        return rows

    def ceval_rows(self, countries, rng, lang_mix=True):
        """Multiple-choice questions in C-Eval's columns, by subject."""
        subjects = {"world_capitals": [], "world_continents": [], "arithmetic": []}
        for c in countries:
            others = rng.sample([o for o in self.countries if o != c], 3)
            q, opts = (f"{c.name_zh}的首都是____。", [c.capital_zh] + [o.capital_zh for o in others])
            if lang_mix and rng.random() < 0.5:
                q, opts = f"The capital of {c.name} is ____.", [c.capital] + [o.capital for o in others]
            subjects["world_capitals"].append(self._choice(q, opts, rng))
            conts = [c.continent_zh] + rng.sample([v for k, v in CONTINENT_ZH.items() if k != c.continent], 3)
            subjects["world_continents"].append(self._choice(f"{c.name_zh}位于哪个大洲？____", conts, rng))
        for _ in range(len(countries)):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            wrong = rng.sample([n for n in range(19) if n != a + b], 3)
            subjects["arithmetic"].append(self._choice(f"{a}加{b}等于____。", [str(a + b)] + [str(n) for n in wrong], rng))
        return subjects

    @staticmethod
    def _choice(question, options, rng):
        """options[0] is right; shuffle and record its letter."""
        order = list(range(4))
        rng.shuffle(order)
        row = {"question": question}
        for letter, k in zip("ABCD", order):
            row[letter] = options[k]
        row["answer"] = "ABCD"[order.index(0)]
        return row


def tool_text(row: dict) -> str:
    """A tool conversation as the chat template renders it (the tokenizer learns its tags and JSON as pieces)."""
    from .tokenizer import render_chat

    return "".join(text for text, _ in render_chat(row["messages"], row["tools"]))


def chat_text(row: dict) -> str:
    """An SFT row (either format) as the chat template renders it: a chat transcript for pretraining."""
    from .processing import normalize_sft
    from .tokenizer import render_chat

    return "".join(text for text, _ in render_chat(normalize_sft(row)["conversations"], row.get("tools")))


def with_transcripts(documents: list[str], transcripts: list[str], repeats: int, rng: random.Random) -> list[str]:
    """The prose documents with `repeats` copies of each chat transcript shuffled in among them.

    Why: a pretrained model copies a country's name from a question to its answer in prose, but not across the chat
    template's tags, which prose never has; SFT then had to form that copy itself, and whether it did depended on
    the order of the machine's sums (docs/demo.md has the figures). Transcripts of the SFT countries form it in
    pretraining; the held-out countries stay out of every transcript.
    """
    mixed = documents + transcripts * repeats
    rng.shuffle(mixed)
    return mixed


def write_demo(out_dir, seed: int = 42, pretrain_repeats: int = 30, held_out: int = 48,
               transcript_repeats: int = 3, copy_passages: int = 0, tool_transcripts: int = 0) -> dict:
    """Write every demo file; returns {name: (path, rows)}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = DemoWorld(seed=seed, held_out=held_out)
    rng = random.Random(seed)
    written = {}

    def jsonl(name, rows):
        n = 0
        with atomic_writer(out / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        written[name] = n

    prose = list(world.pretrain_documents(pretrain_repeats, rng))
    sft = world.sft_rows(rng)
    tool_rows = world.tool_sft_rows(rng)
    # By default three copies each: about 13% of the pretraining tokens (docs/demo.md: chat transcripts)
    documents = with_transcripts(prose, [chat_text(r) for r in sft], transcript_repeats, random.Random(seed + 2))
    # Each part of the corpus draws from its own generator, so that resizing one leaves the others as they were.
    copying = world.copy_documents(random.Random(seed + 3), copy_passages, tool_transcripts)
    documents += copying
    random.Random(seed + 4).shuffle(documents)
    jsonl("pretrain_data.jsonl", ({"text": t} for t in documents))
    jsonl("copy_probe.jsonl", world.copy_probe(random.Random(seed + 5)))
    jsonl("sft_data.jsonl", sft + tool_rows)  # both formats, as data_process.py sft reads them
    jsonl("tool_held_out.jsonl", world.tool_questions(world.held_out, random.Random(seed + 1), 24))
    jsonl("grpo_prompts.jsonl", world.continent_prompts(world.train) + world.keep_prompts(world.train))
    jsonl("grpo_held_out.jsonl", world.continent_prompts(world.held_out))
    jsonl("held_out.jsonl", world.held_out_questions())
    jsonl("dpo_data.jsonl", world.dpo_rows(world.train, rng, balanced=True))
    jsonl("dpo_held_out.jsonl", world.dpo_rows(world.held_out, rng))
    # The tokenizer sees a sample of the world's text (prose, tool conversations, recall passages when there are any),
    # drawn from its own generator and never from the SFT answers: a new answer form must not change every token id
    # of every stage. Without tool conversations in it, the tools' JSON tokenizes long (a request outgrows its context).
    tokenizer_rng = random.Random(seed + 6)
    tokenizer_texts = list(world.pretrain_documents(3, tokenizer_rng))
    tokenizer_texts += [tool_text(r) for r in world.tool_sft_rows(tokenizer_rng)]
    tokenizer_texts += world.copy_documents(tokenizer_rng, copy_passages // 10, 0)
    jsonl("tokenizer_train.jsonl", ({"text": t} for t in tokenizer_texts))
    for split, countries in (("dev", world.train[:5]), ("val", world.held_out)):
        for subject, rows in world.ceval_rows(countries, rng).items():
            path = out / "ceval" / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            columns = ["id", "question", "A", "B", "C", "D", "answer"] + (["explanation"] if split == "dev" else [])
            with atomic_writer(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                for i, r in enumerate(rows):
                    w.writerow({"id": i, **r, **({"explanation": ""} if split == "dev" else {})})
            written[f"ceval/{split}/{subject}_{split}.csv"] = len(rows)
    written["_held_out_countries"] = len(world.held_out)
    return written
