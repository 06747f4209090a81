"""From media and messages to model inputs: the chat template, the tokenizer, image patches."""
