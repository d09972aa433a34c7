"""Writes examples/rubrics/smollm2_rubrics.jsonl: the rubric task of examples/smollm2_rubrics.yaml.

    python tools/make_smollm2_rubrics.py          # rewrites the file (deterministic)

96 prompts for a small instruct model (SmolLM2-135M-Instruct), five families, each mixing criteria a rule
checks (length bounds, an exact number of bullet points, a required word, a reply that ends with a question,
valid JSON with given keys) with criteria an LLM judges (correct, polite, on topic), weighted, and two
pitfalls (a numbered list where bullets were asked for, the word "sorry" where it was forbidden). The prompts
are interleaved across families and every third one is held out (``meta.split``: 64 ``train``, 32
``held_out``); held-out prompts have topics the train split never shows.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "examples" / "rubrics" / "smollm2_rubrics.jsonl"

BULLET = r"^[ \t]*[-*\u2022][ \t]+\S"  # a line that starts with -, * or a bullet, then text
NUMBERED = r"^[ \t]*\d+[.)][ \t]+\S"

LISTS = ["fruits", "vegetables", "farm animals", "sea animals", "birds", "colors", "sports played with a ball",
         "musical instruments", "kitchen tools", "planets of the solar system", "European countries",
         "African countries", "languages spoken in Europe", "winter clothes", "things found in a classroom",
         "board games", "flowers", "insects", "types of weather", "pieces of furniture"]
FACTS = ["the Moon", "the Sun", "honey bees", "the Pacific Ocean", "volcanoes", "penguins", "the human heart",
         "rainbows", "Mount Everest", "elephants", "the Sahara desert", "water", "owls", "the Amazon river", "sharks",
         "trees", "snow", "the Eiffel Tower", "dolphins"]
THINGS = ["a banana", "a fire truck", "a polar bear", "a strawberry", "a lemon", "grass", "a tomato", "a crow",
          "a carrot", "a school bus", "a frog", "an orange", "a flamingo", "milk", "a blueberry", "chocolate",
          "a pumpkin", "snow", "a penguin"]
WORDS = [("Paris", "What is the capital of France?", "The capital of France is Paris."),
         ("seven", "How many days are there in a week?", "There are seven days in a week."),
         ("Pacific", "What is the largest ocean on Earth?", "The largest ocean on Earth is the Pacific Ocean."),
         ("twelve", "How many months are there in a year?", "A year has twelve months."),
         ("Tokyo", "What is the capital of Japan?", "The capital of Japan is Tokyo."),
         ("wings", "How do birds fly?", "Birds fly by flapping their wings."),
         ("milk", "What do cows produce that people drink?", "Cows produce milk."),
         ("green", "What color are most leaves in summer?", "Most leaves are green in summer."),
         ("Earth", "Which planet do we live on?", "We live on the planet Earth."),
         ("four", "How many legs does a cat have?", "A cat has four legs."),
         ("Rome", "What is the capital of Italy?", "The capital of Italy is Rome."),
         ("sixty", "How many minutes are there in an hour?", "An hour has sixty minutes."),
         ("blue", "What color is a clear daytime sky?", "A clear daytime sky is blue."),
         ("bees", "Which insects make honey?", "Honey is made by bees."),
         ("Berlin", "What is the capital of Germany?", "The capital of Germany is Berlin."),
         ("oxygen", "Which gas do humans need to breathe?", "Humans need oxygen to breathe."),
         ("ten", "What is five plus five?", "Five plus five is ten."),
         ("ice", "What does water turn into when it freezes?", "Frozen water turns into ice."),
         ("Madrid", "What is the capital of Spain?", "The capital of Spain is Madrid.")]
COMPLAINTS = ["My order arrived two days late.", "The shoes I bought are the wrong size.",
              "Your website would not let me log in.", "The coffee I ordered was cold.",
              "My package arrived damaged.", "I was charged twice for the same item.",
              "The hotel room was not cleaned.", "The phone I bought will not charge.",
              "The pizza arrived without cheese.", "Nobody answered my email for a week.",
              "The book I ordered is missing pages.", "My flight was cancelled without notice.",
              "The lamp I bought does not turn on.", "I received someone else's order.",
              "The zipper of my new jacket broke after one day.", "My internet has been down all day.",
              "The delivery driver left my parcel in the rain.", "The app keeps crashing on my phone.",
              "The printer I bought prints only blank pages."]


def rule(cid, text, weight, params, **kw):
    return {"id": cid, "text": text, "weight": weight, "verifier": "rule", "verifier_params": params, **kw}


def llm(cid, text, weight=1.0, **kw):
    return {"id": cid, "text": text, "weight": weight, "verifier": "llm", **kw}


def short(n):
    return rule("short", f"The response is at most {n} words long.", 1.0,
                {"check": "length", "max": n, "unit": "words"}, category="important")


def bullets(topic):
    return (f"List exactly three {topic} as bullet points, one per line, each line starting with '- '. "
            "Keep it under 40 words.",
            [rule("three_bullets", "The response has exactly three bullet points.", 2.0,
                  {"check": "count", "pattern": BULLET, "flags": "m", "min": 3, "max": 3}, category="essential"),
             short(40),
             llm("on_topic", f"Every item of the list is one of the {topic}.", 1.0),
             rule("numbered_list", "The response uses a numbered list (1., 2., ...) instead of bullet points.", 1.0,
                  {"check": "count", "pattern": NUMBERED, "flags": "m", "min": 1}, polarity="penalize_if_met",
                  category="pitfall")], None)


def question(topic):
    return (f"In at most two sentences, tell me one fact about {topic}. End your reply with a question for me.",
            [rule("ends_with_question", "The response ends with a question mark.", 2.0,
                  {"check": "regex", "pattern": r"\?[\s\"')]*$"}, category="essential"),
             short(45),
             llm("correct", f"The fact the response states about {topic} is true.", 1.0),
             llm("on_topic", f"The response is about {topic}.", 1.0)], None)


def json_object(thing):
    return (f'Describe {thing} as a JSON object with exactly the keys "name" and "color". Reply with the JSON only.',
            [rule("json_keys", 'The response is valid JSON with the keys "name" and "color".', 2.0,
                  {"check": "json", "required_keys": ["name", "color"]}, category="essential"),
             short(30),
             llm("correct", f"The color given in the response is a real color of {thing}.", 1.0)], None)


def word(item):
    w, q, ref = item
    return (f"Answer in one short sentence that uses the word '{w}': {q}",
            [rule("uses_word", f"The response uses the word '{w}'.", 2.0,
                  {"check": "contains", "text": w, "whole_word": True}, category="essential"),
             short(25),
             llm("correct", f"The response correctly answers the question '{q}'.", 1.0)], ref)


def polite(complaint):
    return (f"A customer writes: \"{complaint}\" Write a short, polite reply of at most 40 words that does not "
            "use the word 'sorry'.",
            [short(40),
             llm("polite", "The reply is polite and friendly to the customer.", 1.0),
             llm("on_topic", "The reply responds to the customer's problem.", 1.0),
             rule("says_sorry", "The response uses the word 'sorry'.", 1.5,
                  {"check": "contains", "text": "sorry", "whole_word": True}, polarity="penalize_if_met",
                  category="pitfall")], None)


FAMILIES = [("list", bullets, LISTS), ("fact", question, FACTS), ("json", json_object, THINGS),
            ("word", word, WORDS), ("reply", polite, COMPLAINTS)]


def records() -> list[dict]:
    per_family = [[(name, i, make(item)) for i, item in enumerate(items)] for name, make, items in FAMILIES]
    interleaved = [x for group in zip(*per_family) for x in group]  # 19 rounds of five families
    leftovers = [x for group in per_family for x in group[len(per_family[1]):]]
    out = []
    for k, (name, i, (prompt, criteria, ref)) in enumerate(interleaved + leftovers):
        out.append({"id": f"{name}-{i:02d}", "prompt": [{"role": "user", "content": prompt}],
                    "reference_answer": ref, "criteria": criteria,
                    "aggregation": {"method": "weighted_mean"},
                    "meta": {"split": "held_out" if k % 3 == 2 else "train", "family": name}})
    return out


def main() -> None:
    recs = records()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    splits = [r["meta"]["split"] for r in recs]
    print(f"wrote {OUT}: {len(recs)} prompts, {splits.count('train')} train, {splits.count('held_out')} held_out")


if __name__ == "__main__":
    main()
