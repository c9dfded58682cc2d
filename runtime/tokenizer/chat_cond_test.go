package tokenizer

import (
	"errors"
	"testing"
)

// condTemplates use if/elif tests found in ChatML templates in the wild (loop.first,
// messages[0]['role'], comparisons, and/or/not); the wanted renderings come from jinja2 3.1.6
// with trim_blocks and lstrip_blocks, as transformers renders them.
var condTemplates = map[string]string{
	"smollm2":      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
	"system-first": "{%- if messages[0]['role'] == 'system' -%}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n{%- endif -%}\n{%- for message in messages -%}\n    {%- if message.role == 'system' and loop.first -%}\n        {# Skip #}\n    {%- else -%}\n        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n    {%- endif -%}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif -%}\n",
	"elif":         "{% for m in messages %}\n{% if m.role == 'user' %}\nU:{{ m.content }}\n{% elif m.role == \"system\" %}\nS:{{ m.content }}\n{% elif not (m.role == 'assistant' or loop.last) %}\n?\n{% else %}\nA:{{ m.content }}{% if not loop.last %}{{ eos_token }}{% endif %}\n\n{% endif %}\n{% endfor %}\n{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}A:{% elif not add_generation_prompt %}{{ messages[-1].content }}{% endif %}",
}

var condMessages = map[string][]Message{
	"sua": chatMessages,
	"u":   {{Role: "user", Content: "hi"}},
	"uau": {{Role: "user", Content: "q1"}, {Role: "assistant", Content: "a1"}, {Role: "user", Content: "q2"}},
}

func TestApplyChatConditionsMatchJinja(t *testing.T) {
	for _, tc := range []struct {
		tmpl, msgs string
		gen        bool
		want       string
	}{
		{"smollm2", "sua", true, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n<|im_start|>assistant\n 9<|im_end|>\n<|im_start|>assistant\n"},
		{"smollm2", "sua", false, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n<|im_start|>assistant\n 9<|im_end|>\n"},
		{"smollm2", "u", true, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"},
		{"smollm2", "u", false, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"},
		{"smollm2", "uau", true, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"},
		{"smollm2", "uau", false, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"},
		{"system-first", "sua", true, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n<|im_start|>assistant\n 9<|im_end|>\n<|im_start|>assistant\n"},
		{"system-first", "sua", false, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n<|im_start|>assistant\n 9<|im_end|>\n"},
		{"system-first", "u", true, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"},
		{"system-first", "u", false, "<|im_start|>user\nhi<|im_end|>\n"},
		{"system-first", "uau", true, "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"},
		{"system-first", "uau", false, "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"},
		{"elif", "sua", true, "S:You are terse.\nU:a = 2 ; n = a + 7 ; ? n =\nline two  \nA: 9\n"},
		{"elif", "sua", false, "S:You are terse.\nU:a = 2 ; n = a + 7 ; ? n =\nline two  \nA: 9\n 9"},
		{"elif", "u", true, "U:hi\nA:"},
		{"elif", "u", false, "U:hi\nhi"},
		{"elif", "uau", true, "U:q1\nA:a1<|im_end|>\nU:q2\nA:"},
		{"elif", "uau", false, "U:q1\nA:a1<|im_end|>\nU:q2\nq2"},
	} {
		ct, err := parseChatTemplate(condTemplates[tc.tmpl], "<|im_start|>", "<|im_end|>")
		if err != nil {
			t.Fatalf("%s: %v", tc.tmpl, err)
		}
		got, err := (&Tokenizer{chat: ct}).ApplyChat(condMessages[tc.msgs], tc.gen)
		if err != nil {
			t.Fatalf("%s: %v", tc.tmpl, err)
		}
		if got != tc.want {
			t.Errorf("%s %s gen=%v:\n got %q\nwant %q", tc.tmpl, tc.msgs, tc.gen, got, tc.want)
		}
	}
}

// FuzzChatTemplate: any template either parses and renders, or is refused with
// ErrUnsupportedTemplate; nothing panics.
func FuzzChatTemplate(f *testing.F) {
	for _, src := range condTemplates {
		f.Add(src)
	}
	for _, src := range chatTemplates {
		f.Add(src)
	}
	f.Fuzz(func(t *testing.T, src string) {
		ct, err := parseChatTemplate(src, "<s>", "</s>")
		if err != nil {
			if !errors.Is(err, ErrUnsupportedTemplate) {
				t.Fatalf("error %v does not wrap ErrUnsupportedTemplate", err)
			}
			return
		}
		tok := &Tokenizer{chat: ct}
		for _, msgs := range [][]Message{nil, chatMessages, condMessages["u"]} {
			if _, err := tok.ApplyChat(msgs, true); err != nil {
				t.Fatal(err)
			}
		}
	})
}
