package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// tokenRecorder passes on what the watcher sets.
type tokenRecorder chan []string

func (r tokenRecorder) SetTokens(t []string) { r <- t }

// TestWatchTokenFile: a rewritten token file (a rotated Secret) reaches the gateway; an empty or
// missing one keeps the tokens in force; the watcher stops with its context.
func TestWatchTokenFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tokens")
	write := func(s string) {
		t.Helper()
		// Write then rename, as the kubelet swaps a Secret's files.
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	write("a\n")
	rec := make(tokenRecorder, 8)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchTokenFile(ctx, path, 5*time.Millisecond, []string{"a"}, rec, slog.New(slog.DiscardHandler))
	}()
	next := func() []string {
		t.Helper()
		select {
		case got := <-rec:
			return got
		case <-time.After(10 * time.Second):
			t.Fatal("no tokens set within 10s")
			return nil
		}
	}
	write("b\n\n c \n")
	if diff := cmp.Diff(next(), []string{"b", "c"}); diff != "" {
		t.Errorf("tokens after rotation (-got +want):\n%s", diff)
	}
	write("\n")
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	write("d")
	if diff := cmp.Diff(next(), []string{"d"}); diff != "" {
		t.Errorf("tokens after an empty file and a missing one (-got +want):\n%s", diff)
	}
	cancel()
	<-done
	select {
	case got := <-rec:
		t.Errorf("unexpected tokens %q", got)
	default:
	}
}
