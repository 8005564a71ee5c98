"""The closed vocabulary of the synthetic scenes: shape kinds, colours, sizes and number words.

Colours are far apart in RGB so that a colour word can be recovered from the pixels even after JPEG
compression. Backgrounds are light tints with names of their own, which no shape takes, so a colour word
in a caption names either a shape or, unambiguously, the background.
"""

SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "star")

COLOURS = {
    "red": (215, 30, 35),
    "green": (30, 150, 55),
    "blue": (35, 70, 215),
    "yellow": (235, 200, 25),
    "orange": (245, 125, 20),
    "purple": (125, 45, 165),
    "brown": (115, 70, 30),
    "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)

# Light tints, far from every shape colour and from each other. Every caption names its image's background,
# as captions of real photographs name their scene: a caption drawn from another image then usually
# contradicts something visible in every grid cell.
BACKGROUNDS = {
    "white": (246, 246, 246),
    "grey": (188, 188, 188),
    "pink": (250, 196, 214),
    "cyan": (180, 236, 246),
    "lime": (214, 246, 168),
    "cream": (248, 234, 190),
}
# Each background is drawn within this many levels of its tint, per channel.
BACKGROUND_JITTER = 6

# Ranges of an object's side, as fractions of the image's short side, drawn for each size. The word an object
# finally gets is read from its side after packing (see scene._size_word), whose thresholds lie between these.
SIZES = {"small": (0.13, 0.17), "medium": (0.19, 0.24), "large": (0.27, 0.32)}
SIZE_NAMES = tuple(SIZES)

TEXTURES = ("plain", "striped", "dotted")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def number_word(count: int) -> str:
    """English word for a small count (0..10)."""
    if not 0 <= count < len(NUMBER_WORDS):
        raise ValueError(f"count: expected 0..{len(NUMBER_WORDS) - 1}, got {count}")
    return NUMBER_WORDS[count]


def with_article(phrase: str) -> str:
    """Prefix 'a' or 'an' according to the phrase's first letter."""
    if not phrase:
        raise ValueError("phrase: expected a non-empty string")
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun(word: str, count: int) -> str:
    """Singular for one, plural otherwise (every noun of this grammar takes a plain -s)."""
    return word if count == 1 else word + "s"
