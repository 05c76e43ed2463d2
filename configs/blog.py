"""The three scenarios of the blog post (../shared/reference/blog-post.md), 256 seeds each."""

from configs import default


def get_config():
  config = default.get_config()
  config.study.scenarios = [
    # Example 1: tiny repetitive text, Adam lr 0.1, no dropout ("always predicts 't'").
    dict(
      name="1_repetitive_lr0.1_do0.0",
      data=dict(corpus="blog_repetitive"),
      train=dict(learning_rate=0.1),
      model=dict(dropout=0.0),
    ),
    # Example 2: varied text, lr 1e-3, dropout 0.2 ("fixes it").
    dict(
      name="2_varied_lr1e-3_do0.2",
      data=dict(corpus="blog_varied"),
      train=dict(learning_rate=1e-3),
      model=dict(dropout=0.2),
    ),
    # Example 3: varied text, lr 1e-4, dropout 0.5 ("even more significant improvement").
    dict(
      name="3_varied_lr1e-4_do0.5",
      data=dict(corpus="blog_varied"),
      train=dict(learning_rate=1e-4),
      model=dict(dropout=0.5),
    ),
  ]
  config.study.claims = "blog"  # End the report with the blog's claims, checked.
  return config
