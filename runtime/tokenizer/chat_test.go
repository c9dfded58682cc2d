package tokenizer

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// chatTemplates are ChatML templates written in the styles seen in the wild; the wanted
// renderings below come from jinja2 3.1.6 with the environment transformers uses
// (trim_blocks, lstrip_blocks).
var chatTemplates = map[string]string{
	"ouro":         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
	"hf-chatml":    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
	"dash-control": "{%- for message in messages %}\n    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n",
	"trim-lstrip":  "{# ChatML #}\n{% for m in messages %}\n  <|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n  {% endfor %}\n{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}\n",
	"plus-else":    "{{ bos_token }}{% for m in messages %}{{ m['role'] ~ ': ' ~ m[\"content\"] }}\n{% endfor %}\t{%+ if not add_generation_prompt +%}\n  done{% else %}  next:\\t{% endif %}{{ eos_token }}\n\n",
}

var chatMessages = []Message{
	{Role: "system", Content: "You are terse."},
	{Role: "user", Content: "a = 2 ; n = a + 7 ; ? n =\nline two  "},
	{Role: "assistant", Content: " 9"},
}

func TestApplyChatMatchesJinja(t *testing.T) {
	for _, tc := range []struct {
		name string
		gen  bool
		want string
	}{
		{"ouro", true, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n<|im_start|>assistant\n 9<|im_end|>\n<|im_start|>assistant\n"},
		{"ouro", false, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n<|im_start|>assistant\n 9<|im_end|>\n"},
		{"hf-chatml", true, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n<|im_start|>assistant\n 9<|im_end|>\n<|im_start|>assistant\n"},
		{"hf-chatml", false, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n<|im_start|>assistant\n 9<|im_end|>\n"},
		{"dash-control", true, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n<|im_start|>assistant\n 9<|im_end|>\n<|im_start|>assistant\n"},
		{"dash-control", false, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n<|im_start|>assistant\n 9<|im_end|>\n"},
		{"trim-lstrip", true, "  <|im_start|>system\nYou are terse.<|im_end|>\n  <|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n  <|im_start|>assistant\n 9<|im_end|>\n<|im_start|>assistant\n"},
		{"trim-lstrip", false, "  <|im_start|>system\nYou are terse.<|im_end|>\n  <|im_start|>user\na = 2 ; n = a + 7 ; ? n =\nline two  <|im_end|>\n  <|im_start|>assistant\n 9<|im_end|>\n"},
		{"plus-else", true, "<|im_start|>system: You are terse.\nuser: a = 2 ; n = a + 7 ; ? n =\nline two  \nassistant:  9\n\t  next:\\t<|im_end|>\n"},
		{"plus-else", false, "<|im_start|>system: You are terse.\nuser: a = 2 ; n = a + 7 ; ? n =\nline two  \nassistant:  9\n\t\n  done<|im_end|>\n"},
	} {
		ct, err := parseChatTemplate(chatTemplates[tc.name], "<|im_start|>", "<|im_end|>")
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		tok := &Tokenizer{chat: ct}
		got, err := tok.ApplyChat(chatMessages, tc.gen)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got != tc.want {
			t.Errorf("%s gen=%v:\n got %q\nwant %q", tc.name, tc.gen, got, tc.want)
		}
	}
}

const modelDir = "../../testdata/models/ouro-tiny-arith"

func TestLoadDirChat(t *testing.T) {
	tok, err := LoadDir(modelDir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := tok.ApplyChat([]Message{{Role: "user", Content: "a = 2 ; ? a ="}}, true)
	if err != nil {
		t.Fatal(err)
	}
	const want = "<|im_start|>user\na = 2 ; ? a =<|im_end|>\n<|im_start|>assistant\n"
	if got != want {
		t.Errorf("ApplyChat = %q, want %q", got, want)
	}
	for _, tc := range []struct {
		name string
		get  func() (int, bool)
		want int
	}{{"BOS", tok.BOS, 1}, {"EOS", tok.EOS, 2}, {"Pad", tok.Pad, 0}} {
		if id, ok := tc.get(); !ok || id != tc.want {
			t.Errorf("%s() = %d, %v; want %d, true", tc.name, id, ok, tc.want)
		}
	}
	// The rendered prompt's special tokens become their ids: two <|im_start|>, one <|im_end|>.
	ids := tok.Encode(got)
	count := map[int]int{}
	for _, id := range ids {
		count[id]++
	}
	if ids[0] != 1 || count[1] != 2 || count[2] != 1 || tok.Decode(ids) != got {
		t.Errorf("Encode(prompt) = %v: want 1 first, two 1s, one 2, decoding back to the prompt", ids)
	}
}

func TestQwenConfigTemplateUnsupported(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(goldenDir, "qwen3", "tokenizer_config.json"))
	if err != nil {
		t.Fatal(err)
	}
	tok := *qwen(t) // a copy: applyConfig sets fields of the shared tokenizer
	if err := tok.applyConfig(data); err != nil {
		t.Fatal(err)
	}
	if id, ok := tok.EOS(); !ok || id != 151645 {
		t.Errorf("EOS() = %d, %v; want 151645, true", id, ok)
	}
	if _, ok := tok.BOS(); ok {
		t.Errorf("BOS() found, want none (bos_token is null)")
	}
	_, err = tok.ApplyChat(chatMessages, true)
	if !errors.Is(err, ErrUnsupportedTemplate) {
		t.Errorf("ApplyChat error = %v, want ErrUnsupportedTemplate", err)
	}
}

func TestChatTemplateErrors(t *testing.T) {
	for _, src := range []string{
		"{% for m in messages %}{{ m.content | trim }}{% endfor %}",
		"{% for m in messages %}{{ m.name }}{% endfor %}",
		"{{ messages[i].content }}",
		"{{ messages[0].name }}",
		"{% if enable_thinking is defined and enable_thinking is true %}x{% endif %}",
		"{% if m.role == 'user' %}x{% endif %}",
		"{% if loop.first %}x{% endif %}",
		"{% for m in messages %}{% if m.role == %}x{% endif %}{% endfor %}",
		"{% for m in messages %}{% if m.role == 'a' and %}x{% endif %}{% endfor %}",
		"{% for m in messages %}{% if (m.role == 'a' %}x{% endif %}{% endfor %}",
		"{% for m in messages %}{% if m.role == 'a' %}x{% elif %}y{% endif %}{% endfor %}",
		"{% for m in messages %}{% if m.role == 'a' %}x{% elif m.role == 'b' %}y{% endfor %}",
		"{% elif add_generation_prompt %}",
		"{% if add_generation_prompt_x %}x{% endif %}",
		"{% if tools %}x{% endif %}",
		"{% for m in messages %}{{ m.role }}",
		"{% endif %}",
		"{{ 'unterminated }}",
		"{% for m in messages %}{% for n in messages %}{% endfor %}{% endfor %}",
		"{{ x.role }}",
		"{{ '\\101' }}",
	} {
		if _, err := parseChatTemplate(src, "", ""); !errors.Is(err, ErrUnsupportedTemplate) {
			t.Errorf("parseChatTemplate(%q) error = %v, want ErrUnsupportedTemplate", src, err)
		}
	}
	if _, err := (&Tokenizer{}).ApplyChat(chatMessages, true); !errors.Is(err, ErrNoTemplate) {
		t.Errorf("ApplyChat without a template: error = %v, want ErrNoTemplate", err)
	}
}

func TestConfigChatTemplateList(t *testing.T) {
	tok, err := Load(filepath.Join(modelDir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := `{"eos_token": {"content": "<|im_end|>", "special": true},
		"chat_template": [{"name": "tool_use", "template": "{{ 'x' }}"},
		                  {"name": "default", "template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"}]}`
	if err := tok.applyConfig([]byte(cfg)); err != nil {
		t.Fatal(err)
	}
	got, err := tok.ApplyChat(chatMessages[:2], false)
	if want := "[You are terse.][a = 2 ; n = a + 7 ; ? n =\nline two  ]"; err != nil || got != want {
		t.Errorf("ApplyChat = %q, %v; want %q", got, err, want)
	}
	if id, ok := tok.EOS(); !ok || id != 2 {
		t.Errorf("EOS() = %d, %v; want 2, true", id, ok)
	}
	if err := tok.applyConfig([]byte(`{"eos_token": "<|nope|>"}`)); !errors.Is(err, ErrInvalid) {
		t.Errorf("unknown eos_token: error = %v, want ErrInvalid", err)
	}
}
