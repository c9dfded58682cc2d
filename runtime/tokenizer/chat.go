package tokenizer

type chatTemplate struct{}
