package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loopserve/loopserve/internal/natstest"
)

// TestNATSCredentials: worker and gateway authenticate with the .creds file the operator mounts
// ($LOOPSERVE_NATS_CREDS), and without it a secured server refuses them with a clear error.
func TestNATSCredentials(t *testing.T) {
	url, creds := natstest.Secured(t)
	path := filepath.Join(t.TempDir(), "nats.creds")
	if err := os.WriteFile(path, creds, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("LOOPSERVE_NATS_CREDS", path)
	for _, cmd := range []string{"worker", "gateway"} {
		t.Run(cmd, func(t *testing.T) {
			c := newRoot()
			sub, _, err := c.Find([]string{cmd})
			if err != nil {
				t.Fatal(err)
			}
			if got := sub.Flags().Lookup("nats-creds").DefValue; got != path {
				t.Errorf("--nats-creds default = %q, want $LOOPSERVE_NATS_CREDS %q", got, path)
			}
		})
	}

	tests := []struct {
		name    string
		creds   string
		wantErr string
	}{
		{name: "with creds", creds: path},
		{name: "without creds", wantErr: "Authorization Violation"},
		{name: "missing file", creds: filepath.Join(t.TempDir(), "absent.creds"), wantErr: "reading NATS credentials"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := natsFlags{url: url, creds: tt.creds}
			nc, err := f.connect(context.Background(), "test", slog.New(slog.DiscardHandler))
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("connect: %v", err)
				}
				defer nc.Close()
				if _, err := nc.JetStream(); err != nil {
					t.Fatalf("JetStream with creds: %v", err)
				}
				return
			}
			if err == nil {
				nc.Close()
				t.Fatalf("connect succeeded, want an error containing %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

// TestNATSConnectWaitsForAServer: with no server up yet the connection keeps being retried
// (no crash loop) and succeeds once one starts; a cancelled context ends the wait with an error.
func TestNATSConnectWaitsForAServer(t *testing.T) {
	port := freePort(t)
	f := natsFlags{url: fmt.Sprintf("nats://127.0.0.1:%d", port)}
	got := make(chan error, 1)
	go func() {
		nc, err := f.connect(context.Background(), "test", slog.New(slog.DiscardHandler))
		if err == nil {
			nc.Close()
		}
		got <- err
	}()
	startTestNATS(t, port)
	select {
	case err := <-got:
		if err != nil {
			t.Errorf("connect after the server started: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("connect did not succeed within 30s of the server starting")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := (&natsFlags{url: fmt.Sprintf("nats://127.0.0.1:%d", freePort(t))}).connect(ctx, "test", slog.New(slog.DiscardHandler)); err == nil {
		t.Error("connect with no server and a cancelled context succeeded")
	}
}
