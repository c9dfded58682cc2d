package main

import (
	"fmt"
	"os"

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
	fl.StringVar(&f.url, "nats", nats.DefaultURL, "NATS server URL")
	fl.StringVar(&f.creds, "nats-creds", os.Getenv("LOOPSERVE_NATS_CREDS"),
		"NATS user credentials (.creds) file; the operator mounts the LoopModel's credentialsSecret and sets $LOOPSERVE_NATS_CREDS")
}

// connect dials NATS, reconnecting forever: a NATS outage must pause serving, not end it.
func (f *natsFlags) connect(name string) (*nats.Conn, error) {
	opts := []nats.Option{nats.Name(name), nats.MaxReconnects(-1)}
	if f.creds != "" {
		if _, err := os.Stat(f.creds); err != nil {
			return nil, fmt.Errorf("reading NATS credentials: %w", err)
		}
		opts = append(opts, nats.UserCredentials(f.creds))
	}
	nc, err := nats.Connect(f.url, opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to NATS %s: %w", f.url, err)
	}
	return nc, nil
}
