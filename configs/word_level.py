"""The blog's scenarios with word tokens: does collapse need a character-level model?"""

from configs import blog


def get_config():
  config = blog.get_config()
  config.data.tokenization = "word"  # Words, not characters (vocab by frequency, as before).
  config.data.context_length = 3  # Three words of context ("the" prompt is shorter: it grows).
  return config
