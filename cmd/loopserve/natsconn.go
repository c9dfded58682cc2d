package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"
)

// natsFlags are the connection settings shared by worker and gateway.
type natsFlags struct {
	url   string
	creds string
}

func (f *natsFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.url, "nats", nats.DefaultURL,
		"NATS server URLs, comma-separated (several servers of a cluster: any one reachable will do, and the rest are learned from it)")
	fl.StringVar(&f.creds, "nats-creds", os.Getenv("LOOPSERVE_NATS_CREDS"),
		"NATS user credentials (.creds) file; the operator mounts the LoopModel's credentialsSecret and sets $LOOPSERVE_NATS_CREDS")
}

// Reconnection pacing: each attempt waits reconnectWait plus a random jitter, so that the
// workers and gateways of a cluster do not all hit the surviving servers at the same instant.
const (
	reconnectWait   = time.Second
	reconnectJitter = time.Second
)

// connect dials NATS and keeps the connection reconnecting forever: a NATS outage must pause
// serving, not end it. While no server answers at all it keeps dialling (with jitter) until ctx
// ends; a server that refuses the credentials is an error at once.
func (f *natsFlags) connect(ctx context.Context, name string, log *slog.Logger) (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(reconnectWait),
		nats.ReconnectJitter(reconnectJitter, 2*reconnectJitter),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("NATS disconnected; reconnecting", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("NATS reconnected", "server", nc.ConnectedUrlRedacted()) }),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Warn("NATS", "err", err, "subscription", subject)
		}),
	}
	if f.creds != "" {
		if _, err := os.Stat(f.creds); err != nil {
			return nil, fmt.Errorf("reading NATS credentials: %w", err)
		}
		opts = append(opts, nats.UserCredentials(f.creds))
	}
	servers := strings.TrimSpace(f.url)
	var logged time.Time
	for {
		nc, err := nats.Connect(servers, opts...)
		if err == nil {
			return nc, nil
		}
		if !errors.Is(err, nats.ErrNoServers) {
			return nil, fmt.Errorf("connecting to NATS %s: %w", servers, err)
		}
		if time.Since(logged) > 30*time.Second {
			log.Warn("no NATS server reachable yet; retrying", "nats", servers, "err", err)
			logged = time.Now()
		}
		t := time.NewTimer(reconnectWait + rand.N(reconnectJitter))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("connecting to NATS %s: %w", servers, errors.Join(err, ctx.Err()))
		case <-t.C:
		}
	}
}
