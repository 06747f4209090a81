"""From media and messages to model inputs: the chat template, the tokenizer, image patches.

After `media` (it takes decoded PIL images, not files) and before `model`; `engine`, `backends`
and `tasks` call it."""
