package model

import (
	"encoding/json"
	"fmt"
	"os"
)

// Config is an Ouro config.json: the fields the runtime needs, with the Hugging Face names.
// The zero value is invalid; use LoadConfig or ParseConfig, which validate.
type Config struct {
	ModelType             string   `json:"model_type"`
	Architectures         []string `json:"architectures,omitempty"`
	VocabSize             int      `json:"vocab_size"`
	HiddenSize            int      `json:"hidden_size"`
	IntermediateSize      int      `json:"intermediate_size"`
	NumHiddenLayers       int      `json:"num_hidden_layers"`
	NumAttentionHeads     int      `json:"num_attention_heads"`
	NumKeyValueHeads      int      `json:"num_key_value_heads"`
	HeadDim               int      `json:"head_dim,omitempty"` // 0: hidden_size / num_attention_heads
	HiddenAct             string   `json:"hidden_act"`
	MaxPositionEmbeddings int      `json:"max_position_embeddings"`
	RMSNormEps            float64  `json:"rms_norm_eps"`
	RopeTheta             float64  `json:"rope_theta"`
	RopeScaling           any      `json:"rope_scaling,omitempty"`
	TieWordEmbeddings     bool     `json:"tie_word_embeddings"`
	TotalUTSteps          int      `json:"total_ut_steps"`
	EarlyExitThreshold    float64  `json:"early_exit_threshold"`
	BOSTokenID            *int     `json:"bos_token_id,omitempty"`
	EOSTokenID            *int     `json:"eos_token_id,omitempty"`
	PadTokenID            *int     `json:"pad_token_id,omitempty"`
	TorchDType            string   `json:"torch_dtype,omitempty"`
	UseSlidingWindow      bool     `json:"use_sliding_window"`
	LayerTypes            []string `json:"layer_types,omitempty"`
}

// LoadConfig reads and validates a config.json.
func LoadConfig(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("reading config: %w", err)
	}
	c, err := ParseConfig(b)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// ParseConfig decodes and validates config.json bytes.
func ParseConfig(b []byte) (Config, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return Config{}, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	for _, k := range []string{"model_type", "vocab_size", "hidden_size", "intermediate_size",
		"num_hidden_layers", "num_attention_heads", "rms_norm_eps", "total_ut_steps"} {
		if _, ok := raw[k]; !ok {
			return Config{}, fmt.Errorf("%w: missing field %q", ErrConfig, k)
		}
	}
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return Config{}, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if _, ok := raw["num_key_value_heads"]; !ok {
		c.NumKeyValueHeads = c.NumAttentionHeads
	}
	if _, ok := raw["rope_theta"]; !ok {
		c.RopeTheta = 10000
	}
	if _, ok := raw["hidden_act"]; !ok {
		c.HiddenAct = "silu"
	}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

// Validate reports the first field that makes the config unusable by this runtime.
func (c Config) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrConfig, fmt.Sprintf(format, a...))
	}
	switch {
	case c.ModelType != "ouro":
		return bad("model_type %q is not supported (want \"ouro\")", c.ModelType)
	case c.VocabSize <= 0:
		return bad("vocab_size %d must be positive", c.VocabSize)
	case c.HiddenSize <= 0:
		return bad("hidden_size %d must be positive", c.HiddenSize)
	case c.IntermediateSize <= 0:
		return bad("intermediate_size %d must be positive", c.IntermediateSize)
	case c.NumHiddenLayers <= 0:
		return bad("num_hidden_layers %d must be positive", c.NumHiddenLayers)
	case c.NumAttentionHeads <= 0:
		return bad("num_attention_heads %d must be positive", c.NumAttentionHeads)
	case c.NumKeyValueHeads <= 0 || c.NumAttentionHeads%c.NumKeyValueHeads != 0:
		return bad("num_key_value_heads %d must divide num_attention_heads %d", c.NumKeyValueHeads, c.NumAttentionHeads)
	case c.HeadDim == 0 && c.HiddenSize%c.NumAttentionHeads != 0:
		return bad("hidden_size %d is not a multiple of num_attention_heads %d", c.HiddenSize, c.NumAttentionHeads)
	case c.HeadDim < 0 || c.HeadDimOrDefault()%2 != 0:
		return bad("head dim %d must be positive and even (RoPE)", c.HeadDimOrDefault())
	case c.TotalUTSteps <= 0 || c.TotalUTSteps > 64:
		return bad("total_ut_steps %d must be in 1..64", c.TotalUTSteps)
	case c.RMSNormEps <= 0:
		return bad("rms_norm_eps %g must be positive", c.RMSNormEps)
	case c.RopeTheta <= 0:
		return bad("rope_theta %g must be positive", c.RopeTheta)
	case c.HiddenAct != "silu":
		return bad("hidden_act %q is not supported (want \"silu\")", c.HiddenAct)
	case c.RopeScaling != nil:
		return bad("rope_scaling is not supported")
	case c.UseSlidingWindow:
		return bad("use_sliding_window is not supported")
	case c.MaxPositionEmbeddings < 0:
		return bad("max_position_embeddings %d must not be negative", c.MaxPositionEmbeddings)
	}
	for i, t := range c.LayerTypes {
		if t != "full_attention" {
			return bad("layer_types[%d] %q is not supported", i, t)
		}
	}
	return nil
}

// HeadDimOrDefault is the attention head width: head_dim, or hidden_size / num_attention_heads.
func (c Config) HeadDimOrDefault() int {
	if c.HeadDim > 0 {
		return c.HeadDim
	}
	return c.HiddenSize / c.NumAttentionHeads
}

// KVDim is the width of one K or V row: num_key_value_heads × head dim.
func (c Config) KVDim() int { return c.NumKeyValueHeads * c.HeadDimOrDefault() }

// QDim is the width of the query projection: num_attention_heads × head dim.
func (c Config) QDim() int { return c.NumAttentionHeads * c.HeadDimOrDefault() }

// EOS returns the end-of-sequence id, or -1 when the config names none.
func (c Config) EOS() int {
	if c.EOSTokenID == nil {
		return -1
	}
	return *c.EOSTokenID
}
