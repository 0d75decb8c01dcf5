"""Writes tales.txt: small, original English prose for the character-level LM example.

Everything here (word lists, templates) was written for fastattn and is dedicated to the
public domain (CC0). The text is generated from a fixed seed, so the file is reproducible:

    python examples/data/make_corpus.py            # writes examples/data/tales.txt
"""

import os
import random
import textwrap

NAMES = ["Ada", "Bram", "Cora", "Dov", "Elin", "Finn", "Greta", "Hugo", "Ines", "Jory", "Kasia",
         "Lev", "Mira", "Nils", "Oona", "Pavel", "Quill", "Rosa", "Silas", "Tova", "Ulla", "Vik",
         "Wren", "Yara", "Zeno"]
TRADES = ["baker", "miller", "weaver", "shepherd", "ferryman", "lamplighter", "clockmaker",
          "fisher", "potter", "smith", "beekeeper", "cartographer", "gardener", "bell ringer",
          "carpenter", "herbalist", "tailor", "stonemason", "innkeeper", "scribe"]
PLACES = ["the village by the river", "a town on the hill", "the valley of seven mills",
          "a harbour full of grey boats", "the edge of the old forest", "a city of narrow streets",
          "the island where the wind never sleeps", "a farm at the end of the long road",
          "the marsh country", "a mountain pass", "the market town", "a quiet bay"]
OBJECTS = ["a brass key", "a blue lantern", "an old map", "a wooden flute", "a silver coin",
           "a basket of apples", "a broken compass", "a red scarf", "a jar of honey",
           "a letter sealed with wax", "a small iron bell", "a book with no title",
           "a feather as long as an arm", "a clay cup", "a coil of rope", "a loaf of warm bread"]
ANIMALS = ["fox", "crow", "goat", "heron", "badger", "cat", "owl", "hare", "dog", "mule",
           "sparrow", "otter", "tortoise", "wolf", "horse"]
ADJ = ["quiet", "stubborn", "clever", "patient", "curious", "tired", "cheerful", "proud",
       "careful", "restless", "gentle", "foolish", "brave", "honest", "sleepy", "kind"]
WEATHER = ["The rain had not stopped for three days.", "The morning was cold and clear.",
           "A thick fog lay over the fields.", "The sun was hot and the road was dusty.",
           "Snow had fallen in the night and covered every roof.",
           "The wind came from the sea and smelled of salt.",
           "It was the first warm evening of the spring.",
           "Leaves were falling, yellow and brown, into the water."]
FEELINGS = ["glad", "worried", "surprised", "ashamed", "grateful", "afraid", "angry", "amused",
            "lonely", "hopeful"]
MORALS = ["A kind word costs nothing and is worth a great deal.",
          "Those who listen learn more than those who talk.",
          "The slow road is often the one that arrives.",
          "What is shared grows, and what is hoarded spoils.",
          "A promise is a small thing to make and a large thing to keep.",
          "Nobody is too small to help and nobody is too great to be helped.",
          "Pride builds high walls and small rooms.",
          "The best map is the one you draw yourself.",
          "Patience opens more doors than force.",
          "It is better to ask the way than to be lost with dignity."]
TIMES = ["Long ago", "Once", "In a year of good harvests", "Not so long ago",
         "In the days when the bridges were still made of wood", "One winter",
         "Early one summer", "In the time of the old king"]
VERBS_PAST = ["found", "lost", "carried", "mended", "sold", "hid", "buried", "painted",
              "borrowed", "guarded"]
DIALOGUE = [
    "\"Where are you going in such a hurry?\" asked {b}.",
    "\"I have a long way to go before dark,\" said {a}.",
    "\"Can you help me?\" asked {a}. \"I cannot do it alone.\"",
    "\"Why should I help you?\" said {b}. \"What will you give me?\"",
    "\"I have nothing but {obj},\" said {a}, \"and I need it myself.\"",
    "\"Then keep it,\" said {b}, \"and I will help you anyway.\"",
    "\"Look,\" whispered {a}, \"the light in the window is on again.\"",
    "\"That is strange,\" said {b}. \"Nobody has lived there for years.\"",
    "\"Tomorrow,\" said {a}, \"we will try once more.\"",
    "\"Do not be afraid,\" said {b}. \"It is only the wind.\"",
    "\"Thank you,\" said {a}. \"I will not forget this.\"",
    "\"Every road has two ends,\" said {b}, \"and you are standing on one of them.\"",
]


SUBJ_ADJ = ["old", "young", "small", "grey", "tall", "thin", "quick", "lazy", "wet", "noisy",
            "silent", "hungry", "lost", "lucky", "wise", "shy", "wild", "lame", "spotted", "white"]
NOUNS = ["boat", "door", "window", "cart", "bridge", "lamp", "garden", "tower", "well", "fence",
         "chimney", "mill wheel", "gate", "ladder", "kettle", "drum", "boot", "wagon", "roof", "clock"]
ACTIONS = ["creaked in the wind", "would not open", "had been painted green", "stood empty",
           "was older than anyone could remember", "leaned to one side", "shone in the sun",
           "was covered in moss", "made a sound like a bird", "needed mending again",
           "had a crack down the middle", "was the pride of the street", "smelled of smoke",
           "rattled every time a horse went by", "was moved twice and then put back"]
PREPS = ["behind the bakery", "at the corner of the square", "beside the chapel", "under the elms",
         "on the far bank", "near the school", "past the last house", "across from the inn",
         "at the bottom of the lane", "on the road to the coast", "above the harbour wall"]
COUNTS = ["two", "three", "four", "five", "six", "seven", "a dozen", "twenty", "a hundred"]
THINGS = ["sheep", "letters", "candles", "nails", "pears", "buttons", "fish", "stones", "bells",
          "eggs", "cups", "ribbons", "sacks of flour", "barrels", "pigeons"]
VERBS = ["counted", "carried", "sold", "lost", "found", "painted", "mended", "hid", "gave away",
         "wrapped", "washed", "sorted", "weighed", "fed", "numbered"]
WHEN = ["before breakfast", "after the storm", "on Tuesday", "at midnight", "in the spring",
        "every Sunday", "when the tide was low", "during the fair", "at first light",
        "while the others slept", "on the longest day of the year"]


def free_sentence(r, a, b):
    """A sentence with several independently drawn slots (keeps the text from being
    trivially memorizable)."""
    k = r.randrange(5)
    if k == 0:
        return (f"The {r.choice(SUBJ_ADJ)} {r.choice(NOUNS)} {r.choice(PREPS)} "
                f"{r.choice(ACTIONS)}.")
    if k == 1:
        return (f"{r.choice([a, b])} {r.choice(VERBS)} {r.choice(COUNTS)} {r.choice(THINGS)} "
                f"{r.choice(WHEN)}.")
    if k == 2:
        w = r.choice(WHEN)
        return (f"{w[0].upper() + w[1:]}, {r.choice([a, b])} went {r.choice(PREPS)} and "
                f"{r.choice(VERBS)} the {r.choice(SUBJ_ADJ)} {r.choice(NOUNS)}.")
    if k == 3:
        return (f"There were {r.choice(COUNTS)} {r.choice(THINGS)} {r.choice(PREPS)}, and "
                f"nobody knew {r.choice(['who had left them', 'where they came from', 'whose they were'])}.")
    return (f"\"Have you seen the {r.choice(SUBJ_ADJ)} {r.choice(NOUNS)}?\" asked {r.choice([a, b])}. "
            f"\"It {r.choice(ACTIONS)}.\"")


def sentence_pool(r, a, b, trade, place, obj, animal, adj):
    return [
        f"{a} was a {adj} {trade} who lived in {place}.",
        f"Every morning {a} walked to the well and counted the birds on the roof.",
        f"One day {a} {r.choice(VERBS_PAST)} {obj} near the old stone bridge.",
        f"Nobody in {place} knew where {obj} had come from.",
        f"{b}, who kept a {animal} in the yard, came over to look.",
        f"The {animal} looked at {obj} and then at {a}, and did not move.",
        f"{a} felt {r.choice(FEELINGS)}, but said nothing for a long time.",
        f"In the evening the two of them sat by the fire and talked about the road ahead.",
        f"The path went up through the trees, then down again to the water.",
        f"By noon they had reached the crossing, where the river was wide and slow.",
        f"{b} laughed, because the {animal} had followed them all the way.",
        f"They shared their bread with a stranger who had nothing to eat.",
        f"At the top of the hill {a} turned and saw {place} far below, small as a toy.",
        f"The {trade} from the next valley said that such things happen once in a hundred years.",
        f"{a} put {obj} in a pocket and kept walking.",
        f"When the moon came up, the {animal} began to sing in a thin, high voice.",
        f"It was late when they came home, and the lamps were already lit.",
        f"{b} wrote everything down in a little book, so that nobody would forget.",
        f"The next day was market day, and the square was full of noise and colour.",
        f"{a} sold three baskets before noon and gave the last one away.",
    ]


def tale(r):
    a, b = r.sample(NAMES, 2)
    trade, place, obj = r.choice(TRADES), r.choice(PLACES), r.choice(OBJECTS)
    animal, adj = r.choice(ANIMALS), r.choice(ADJ)
    pool = sentence_pool(r, a, b, trade, place, obj, animal, adj)
    rest = pool[1:]
    r.shuffle(rest)  # each sentence at most once per tale
    talk = [d.format(a=a, b=b, obj=obj) for d in DIALOGUE]
    r.shuffle(talk)
    paras = []
    opening = [f"{r.choice(TIMES)}, in {place}, there lived a {adj} {trade} called {a}.",
               r.choice(WEATHER)]
    opening += [rest.pop() for _ in range(2)]
    paras.append(" ".join(opening))
    for _ in range(r.randint(2, 4)):
        if r.random() < 0.5:
            paras.extend(talk.pop() for _ in range(r.randint(1, 3)))
        sents = [rest.pop() for _ in range(r.randint(1, 3))]
        sents += [free_sentence(r, a, b) for _ in range(r.randint(1, 3))]
        r.shuffle(sents)
        paras.append(" ".join(sents))
    paras.append(f"And so {a} and {b} became friends, and the {animal} with them. "
                 + r.choice(MORALS))
    title = f"The {adj.capitalize()} {trade.title()} and the {animal.capitalize()}"
    body = "\n\n".join(textwrap.fill(p, 78) for p in paras)
    return f"{title}\n\n{body}\n"


def main(target_bytes=200_000, seed=1234):
    r = random.Random(seed)
    tales = []
    total = 0
    while total < target_bytes:
        t = tale(r)
        tales.append(t)
        total += len(t) + 2
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tales.txt")
    with open(path, "w", encoding="ascii") as f:
        f.write("\n\n".join(tales))
    print(f"wrote {path}: {total} bytes, {len(tales)} tales")


if __name__ == "__main__":
    main()
