"""Quality evaluation: a fixed text corpus and perplexity over it."""
