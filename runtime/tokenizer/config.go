package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// configJSON is the part of tokenizer_config.json this package reads. Special tokens are
// either a string or an AddedToken object with a content field.
type configJSON struct {
	BOS          json.RawMessage `json:"bos_token"`
	EOS          json.RawMessage `json:"eos_token"`
	Pad          json.RawMessage `json:"pad_token"`
	ChatTemplate json.RawMessage `json:"chat_template"`
}

// LoadDir reads a model folder's tokenizer.json and, when present, its
// tokenizer_config.json, which gives the BOS, EOS and pad tokens and the chat template.
// A chat template outside the supported subset does not fail the load: ApplyChat then
// returns an error wrapping ErrUnsupportedTemplate.
func LoadDir(dir string) (*Tokenizer, error) {
	t, err := Load(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "tokenizer_config.json")
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading tokenizer config: %w", err)
	}
	if err := t.applyConfig(data); err != nil {
		return nil, fmt.Errorf("loading tokenizer config %s: %w", path, err)
	}
	return t, nil
}

func (t *Tokenizer) applyConfig(data []byte) error {
	var c configJSON
	if err := json.Unmarshal(data, &c); err != nil {
		return fmt.Errorf("%w: parsing JSON: %w", ErrInvalid, err)
	}
	var texts [3]string
	for i, f := range []struct {
		name string
		raw  json.RawMessage
		id   *int
	}{{"bos_token", c.BOS, &t.bos}, {"eos_token", c.EOS, &t.eos}, {"pad_token", c.Pad, &t.pad}} {
		s, ok, err := specialText(f.raw)
		if err != nil {
			return fmt.Errorf("%w: %s: %w", ErrInvalid, f.name, err)
		}
		if !ok {
			continue
		}
		id, known := t.TokenID(s)
		if !known {
			return fmt.Errorf("%w: %s %q is not a token", ErrInvalid, f.name, s)
		}
		*f.id = id
		texts[i] = s
	}
	src, ok, err := templateSource(c.ChatTemplate)
	switch {
	case err != nil:
		t.chatErr = fmt.Errorf("%w: %w", ErrUnsupportedTemplate, err)
	case ok:
		t.chat, t.chatErr = parseChatTemplate(src, texts[0], texts[1])
	}
	return nil
}

// specialText reads a special token entry: null, a string, or {"content": ...}.
func specialText(raw json.RawMessage) (string, bool, error) {
	if isNull(raw) {
		return "", false, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, true, nil
	}
	var obj struct {
		Content *string `json:"content"`
	}
	if err := json.Unmarshal(raw, &obj); err != nil || obj.Content == nil {
		return "", false, fmt.Errorf("neither a string nor an object with content")
	}
	return *obj.Content, true, nil
}

// templateSource reads chat_template: a string, or a list of named templates of which
// the one named "default" is what apply_chat_template uses.
func templateSource(raw json.RawMessage) (string, bool, error) {
	if isNull(raw) {
		return "", false, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, true, nil
	}
	var named []struct {
		Name     string `json:"name"`
		Template string `json:"template"`
	}
	if err := json.Unmarshal(raw, &named); err != nil {
		return "", false, fmt.Errorf("chat_template is neither a string nor a list of named templates")
	}
	for _, n := range named {
		if n.Name == "default" {
			return n.Template, true, nil
		}
	}
	return "", false, fmt.Errorf("chat_template list has no template named default")
}

// EOS returns the id of the end-of-sequence token named by tokenizer_config.json's
// eos_token; false when LoadDir found none.
func (t *Tokenizer) EOS() (int, bool) { return t.eos, t.eos >= 0 }

// BOS returns the id of tokenizer_config.json's bos_token. Encode never adds it.
func (t *Tokenizer) BOS() (int, bool) { return t.bos, t.bos >= 0 }

// Pad returns the id of tokenizer_config.json's pad_token.
func (t *Tokenizer) Pad() (int, bool) { return t.pad, t.pad >= 0 }
