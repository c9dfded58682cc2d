package tokenizer

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func BenchmarkLoadQwen(b *testing.B) {
	path := filepath.Join(goldenDir, "qwen3", "tokenizer.json")
	data, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := Parse(data); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseSmall(b *testing.B) {
	data := synthJSON(synthMerges, true, `{"type":"NFC"}`)
	for b.Loop() {
		if _, err := Parse(data); err != nil {
			b.Fatal(err)
		}
	}
}

// proseText is the golden prose cases joined: code, docs, Unicode.
func proseText(b *testing.B) string {
	g, _ := readGolden(b, filepath.Join("qwen3", "golden.json"))
	var sb strings.Builder
	for _, c := range g.Cases {
		if !strings.Contains(c.Text, "<|") {
			sb.WriteString(c.Text)
			sb.WriteByte('\n')
		}
	}
	return sb.String()
}

// BenchmarkEncodeQwen measures steady-state encoding (word cache warm).
func BenchmarkEncodeQwen(b *testing.B) {
	tk := qwen(b)
	text := proseText(b)
	b.SetBytes(int64(len(text)))
	for b.Loop() {
		tk.Encode(text)
	}
}

// BenchmarkEncodeQwenCold measures encoding with an empty word cache each time.
func BenchmarkEncodeQwenCold(b *testing.B) {
	tk := qwen(b)
	text := proseText(b)
	b.SetBytes(int64(len(text)))
	for b.Loop() {
		tk.model.cache = newWordCache()
		tk.Encode(text)
	}
}

func BenchmarkDecodeQwen(b *testing.B) {
	tk := qwen(b)
	ids := tk.Encode(proseText(b))
	for b.Loop() {
		tk.Decode(ids)
	}
}
