"""The blog's scenarios decoded four ways from the same trained seeds: is collapse greedy's?"""

from configs import blog


def get_config():
  config = blog.get_config()
  # Each decoding continues the same prompts from the same trained seeds; rows "<cell>@<name>".
  config.study.decodings = [
    dict(name="greedy", strategy="greedy"),  # Argmax, as in the blog.
    dict(name="T0.5", strategy="temperature", temperature=0.5),  # Sharpened sampling.
    dict(name="T1.0", strategy="temperature", temperature=1.0),  # Plain sampling.
    dict(name="top_p0.9", strategy="top_p", temperature=1.0, top_p=0.9),  # Nucleus sampling.
  ]
  return config
