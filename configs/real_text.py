"""The blog's three settings on real English (pydoc_topics), at char and at word level.

Six scenarios x 256 seeds: does what the blog's tiny texts show survive a real corpus?
"""

from configs import default

# The blog's examples 1-3 (configs/blog.py): name suffix, Adam learning rate, dropout.
BLOG_SETTINGS = (("1_lr0.1_do0.0", 0.1, 0.0), ("2_lr1e-3_do0.2", 1e-3, 0.2),
                 ("3_lr1e-4_do0.5", 1e-4, 0.5))  # fmt: skip


def get_config():
  config = default.get_config()
  config.data.corpus = "pydoc_topics"  # CPython's bundled help texts: English, no download.
  # Its first 300 characters (of ~417k; 296 char / 36 word windows), so that the whole study
  # runs in minutes on 2 CPU cores: 4 min 8 s measured (this project's shared 2-core machine,
  # jax 0.10.2); 1000 characters took 15 min 41 s. Cost grows about linearly with max_chars.
  # A 16-seed, 2-epoch run takes 26 s, nearly all compilation and evaluation: no basis to scale.
  config.data.max_chars = 300
  config.data.context_length = 3  # The blog's 3 tokens of context, chars or words.
  config.train.epochs = 100  # As the blog.
  config.train.batch_size = 32  # As the blog (Keras default).
  # Continue "the" and every distinct training context, as on the blog's texts: 183 char / 36
  # word contexts here, ~10k / ~42k on the whole text; generate.max_prompts (coming) bounds it.
  config.generate.include_training_contexts = True
  config.study.seeds = 256  # As configs/blog.py.
  config.study.claims = ""  # The blog's claims are about the blog's texts: none checked here.
  config.study.scenarios = [
    dict(
      name=f"{tokenization}_{suffix}",
      data=dict(tokenization=tokenization),
      train=dict(learning_rate=lr),
      model=dict(dropout=dropout),
    )
    for tokenization in ("char", "word")
    for suffix, lr, dropout in BLOG_SETTINGS
  ]
  return config
