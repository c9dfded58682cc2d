// Package loadtest drives an OpenAI-compatible completions endpoint with concurrent streaming
// clients and measures requests/s, time to first token and inter-token latency, as a client
// sees them. `loopserve bench serve` and the serving tests use it.
package loadtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Options describe one load run. URL, Model and Clients are required; Requests or Duration
// bounds the requests issued (whichever comes first; at least one must be set). Requests issued
// before the Duration is up still run to their end and count.
type Options struct {
	URL       string        // gateway base URL, e.g. http://127.0.0.1:8080
	Model     string        // model id
	Clients   int           // concurrent streaming clients
	Requests  int           // total requests; 0 = until Duration
	Duration  time.Duration // 0 = until Requests
	MaxTokens int           // per request; 0 = 16
	Prompts   []string      // cycled; empty = arithmetic prompts like the tiny model's training data
	// ExitThreshold, when > 0, is sent as exit_threshold (loopserve's per-request τ).
	ExitThreshold float64
	Token         string       // bearer token, if the gateway wants one
	Client        *http.Client // nil = a client sized for Clients connections
}

// Result is what the clients measured. Latency slices are sorted.
type Result struct {
	Requests int           // completed without error
	Errors   int           // failed requests (any status other than 200, or a broken stream)
	FirstErr error         // the first failure, for the report
	Tokens   int           // tokens received (sum of loop_depths lengths)
	Depths   int           // sum of the tokens' loop depths
	Elapsed  time.Duration // wall time of the run
	TTFT     []time.Duration
	ITL      []time.Duration
}

// RequestsPerSecond is completed requests over the run's wall time.
func (r Result) RequestsPerSecond() float64 { return float64(r.Requests) / r.Elapsed.Seconds() }

// TokensPerSecond is tokens received over the run's wall time.
func (r Result) TokensPerSecond() float64 { return float64(r.Tokens) / r.Elapsed.Seconds() }

// MeanDepth is the mean loop depth of the tokens received (0 without tokens).
func (r Result) MeanDepth() float64 {
	if r.Tokens == 0 {
		return 0
	}
	return float64(r.Depths) / float64(r.Tokens)
}

// Quantile returns the q-quantile (nearest rank) of sorted durations, 0 when empty.
func Quantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	i := int(q*float64(len(d))+0.5) - 1
	return d[max(0, min(i, len(d)-1))]
}

// ArithPrompt returns the i-th prompt of a deterministic family shaped like the tiny model's
// training data ("a = 2 ; n = a + 7 ; b = 0 ; ? n =").
func ArithPrompt(i int) string {
	v := []string{"a", "b", "c", "d", "n", "x", "y", "z"}
	x, y := v[i%len(v)], v[(i/len(v)+1+i)%len(v)]
	if x == y {
		y = "q"
	}
	return fmt.Sprintf("%s = %d ; %s = %s + %d ; ? %s =", x, i%10, y, x, (i/3)%10, y)
}

// Run drives the endpoint until the options' bound and returns the measurements. It returns an
// error only for unusable options or a cancelled ctx; failed requests are counted in Result.
func Run(ctx context.Context, o Options) (Result, error) {
	if o.URL == "" || o.Model == "" || o.Clients <= 0 || (o.Requests <= 0 && o.Duration <= 0) {
		return Result{}, fmt.Errorf("loadtest: URL, Model, Clients and Requests or Duration are required")
	}
	if o.MaxTokens <= 0 {
		o.MaxTokens = 16
	}
	client := o.Client
	if client == nil {
		client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: o.Clients, MaxConnsPerHost: 0}}
		defer client.CloseIdleConnections()
	}
	var (
		mu     sync.Mutex
		res    Result
		issued atomic.Int64
		wg     sync.WaitGroup
	)
	start := time.Now()
	for range o.Clients {
		wg.Go(func() {
			for {
				n := issued.Add(1)
				if (o.Requests > 0 && int(n) > o.Requests) || ctx.Err() != nil || (o.Duration > 0 && time.Since(start) >= o.Duration) {
					return
				}
				prompt := ArithPrompt(int(n))
				if len(o.Prompts) > 0 {
					prompt = o.Prompts[int(n)%len(o.Prompts)]
				}
				one, err := stream(ctx, client, o, prompt)
				mu.Lock()
				if err != nil {
					res.Errors++
					if res.FirstErr == nil {
						res.FirstErr = err
					}
				} else {
					res.Requests++
					res.Tokens += one.tokens
					res.Depths += one.depths
					res.TTFT = append(res.TTFT, one.ttft)
					res.ITL = append(res.ITL, one.itl...)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	slices.Sort(res.TTFT)
	slices.Sort(res.ITL)
	return res, ctx.Err()
}

type oneResult struct {
	ttft   time.Duration
	itl    []time.Duration
	tokens int
	depths int
}

func stream(ctx context.Context, client *http.Client, o Options, prompt string) (oneResult, error) {
	body := map[string]any{"model": o.Model, "prompt": prompt, "max_tokens": o.MaxTokens, "stream": true}
	if o.ExitThreshold > 0 {
		body["exit_threshold"] = o.ExitThreshold
	}
	b, _ := json.Marshal(body)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimRight(o.URL, "/")+"/v1/completions", bytes.NewReader(b))
	if err != nil {
		return oneResult{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	if o.Token != "" {
		req.Header.Set("Authorization", "Bearer "+o.Token)
	}
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return oneResult{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return oneResult{}, fmt.Errorf("status %d: %s", resp.StatusCode, bytes.TrimSpace(msg))
	}
	var (
		r    oneResult
		last time.Time
	)
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			if r.tokens == 0 {
				r.ttft = time.Since(start) // nothing generated: the whole answer is the first "token"
			}
			return r, nil
		}
		var ev struct {
			Choices []struct {
				LoopDepths []int `json:"loop_depths"`
			} `json:"choices"`
			Error *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			return oneResult{}, fmt.Errorf("bad event %q: %w", data, err)
		}
		if ev.Error != nil {
			return oneResult{}, errors.New(ev.Error.Message)
		}
		now := time.Now()
		for _, c := range ev.Choices {
			if len(c.LoopDepths) == 0 {
				continue
			}
			if r.tokens == 0 {
				r.ttft = now.Sub(start)
			} else {
				r.itl = append(r.itl, now.Sub(last))
			}
			last = now
			r.tokens += len(c.LoopDepths)
			for _, d := range c.LoopDepths {
				r.depths += d
			}
		}
	}
	if err := sc.Err(); err != nil {
		return oneResult{}, err
	}
	return oneResult{}, fmt.Errorf("stream ended without [DONE]")
}
