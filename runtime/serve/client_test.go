package serve

import (
	"bufio"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// officialClientHeaders are the headers the official openai Python client (v1) sends.
var officialClientHeaders = map[string]string{
	"Accept": "application/json", "Content-Type": "application/json", "User-Agent": "OpenAI/Python 1.99.9",
	"X-Stainless-Lang": "python", "X-Stainless-Package-Version": "1.99.9", "X-Stainless-OS": "Linux", "X-Stainless-Arch": "x64",
	"X-Stainless-Runtime": "CPython", "X-Stainless-Runtime-Version": "3.12.3", "X-Stainless-Async": "false",
	"x-stainless-retry-count": "0", "x-stainless-read-timeout": "600", "Authorization": "Bearer sk-test",
}

// required checks that a decoded JSON object holds every key the client's models require.
func required(t *testing.T, where string, obj map[string]any, keys ...string) {
	t.Helper()
	for _, k := range keys {
		if _, ok := obj[k]; !ok {
			t.Errorf("%s lacks %q: %v", where, k, obj)
		}
	}
}

// TestOfficialClientRequests sends bodies exactly as the official openai Python client builds
// them for completions.create and chat.completions.create (only the arguments given, in its
// key order, with its headers) and checks every answer has the fields its response models
// require, whole and streamed.
func TestOfficialClientRequests(t *testing.T) {
	c := newCluster(t, clusterOptions{tokens: []string{"sk-test"}})
	c.startWorker("w1", newGenerator(t), WorkerOptions{})
	for _, tc := range []struct {
		name, path, body string
		stream, chat     bool
	}{
		{"completions.create(logprobs=2, echo=True, n=2)", "/v1/completions",
			`{"model": "default/ouro-tiny-arith", "prompt": "a = 2 ; ? a =", "echo": true, "logprobs": 2, "max_tokens": 5, "n": 2, "seed": 1, "temperature": 0.8}`, false, false},
		{"completions.create(stream=True, stream_options)", "/v1/completions",
			`{"model": "default/ouro-tiny-arith", "prompt": "a = 2 ; ? a =", "logprobs": 1, "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}}`, true, false},
		{"chat.completions.create(logprobs=True, top_logprobs=2, n=2)", "/v1/chat/completions",
			`{"messages": [{"role": "system", "content": "You compute."}, {"role": "user", "content": "a = 2 ; ? a ="}], "model": "default/ouro-tiny-arith", "logprobs": true, "max_completion_tokens": 5, "n": 2, "top_logprobs": 2, "user": "u-1"}`, false, true},
		{"chat.completions.create(stream=True)", "/v1/chat/completions",
			`{"messages": [{"role": "user", "content": [{"type": "text", "text": "a = 2 ; ? a ="}]}], "model": "default/ouro-tiny-arith", "logprobs": true, "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}, "top_logprobs": 1}`, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodPost, c.gw.URL+tc.path, strings.NewReader(tc.body))
			for k, v := range officialClientHeaders {
				req.Header.Set(k, v)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d", resp.StatusCode)
			}
			var objs []map[string]any
			if tc.stream {
				sc := bufio.NewScanner(resp.Body)
				done := false
				for sc.Scan() {
					line, ok := strings.CutPrefix(sc.Text(), "data: ")
					if !ok {
						continue
					}
					if line == "[DONE]" {
						done = true
						break
					}
					var o map[string]any
					if err := json.Unmarshal([]byte(line), &o); err != nil {
						t.Fatal(err)
					}
					objs = append(objs, o)
				}
				if !done {
					t.Error("stream without data: [DONE]")
				}
			} else {
				var o map[string]any
				if err := json.NewDecoder(resp.Body).Decode(&o); err != nil {
					t.Fatal(err)
				}
				objs = append(objs, o)
				required(t, "response", o, "usage")
			}
			wantObject := map[[2]bool]string{{false, false}: "text_completion", {true, false}: "text_completion",
				{false, true}: "chat.completion", {true, true}: "chat.completion.chunk"}[[2]bool{tc.stream, tc.chat}]
			sawLogprobs := false
			for _, o := range objs {
				required(t, "response", o, "id", "object", "created", "model", "choices")
				if o["object"] != wantObject {
					t.Errorf("object %v, want %s", o["object"], wantObject)
				}
				for _, ch := range o["choices"].([]any) {
					ch := ch.(map[string]any)
					required(t, "choice", ch, "index", "finish_reason", "logprobs")
					switch {
					case tc.chat && tc.stream:
						required(t, "chunk choice", ch, "delta")
					case tc.chat:
						required(t, "choice", ch, "message")
						required(t, "message", ch["message"].(map[string]any), "role", "content")
					default:
						required(t, "choice", ch, "text")
					}
					lp, _ := ch["logprobs"].(map[string]any)
					if lp == nil {
						continue
					}
					sawLogprobs = true
					if tc.chat {
						required(t, "logprobs", lp, "content")
						for _, e := range lp["content"].([]any) {
							e := e.(map[string]any)
							required(t, "token logprob", e, "token", "logprob", "bytes", "top_logprobs")
							for _, top := range e["top_logprobs"].([]any) {
								required(t, "top logprob", top.(map[string]any), "token", "logprob", "bytes")
							}
						}
					} else {
						required(t, "logprobs", lp, "tokens", "token_logprobs", "top_logprobs", "text_offset")
					}
				}
			}
			if !sawLogprobs {
				t.Error("no choice carried logprobs")
			}
		})
	}
}
