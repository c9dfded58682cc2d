package serve

import (
	"fmt"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// NATSOptions configure an embedded NATS server.
type NATSOptions struct {
	Host     string // listen address; "" = 127.0.0.1
	Port     int    // 0 = pick a free port
	StoreDir string // JetStream data directory (required)
}

// StartNATS starts an embedded NATS server with JetStream and waits until it accepts clients.
// Call Shutdown (and WaitForShutdown) on the result to stop it.
//
// JetStream is set to fsync every write (SyncAlways). The server's default flushes to disk only
// every two minutes, and Jepsen's analysis of NATS 2.12.1 showed that this loses acknowledged
// messages when machines crash; loopserve acks requests to clients as accepted once JetStream
// stored them, so production NATS servers should use the same setting:
//
//	jetstream { store_dir: /data, sync_interval: always }
func StartNATS(o NATSOptions) (*server.Server, error) {
	if o.StoreDir == "" {
		return nil, fmt.Errorf("starting NATS: a JetStream store directory is required")
	}
	host := o.Host
	if host == "" {
		host = "127.0.0.1"
	}
	port := o.Port
	if port == 0 {
		port = server.RANDOM_PORT
	}
	s, err := server.NewServer(&server.Options{
		ServerName: "loopserve",
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   o.StoreDir,
		SyncAlways: true,
		NoSigs:     true,
		NoLog:      true,
		MaxPayload: 8 << 20,
	})
	if err != nil {
		return nil, fmt.Errorf("starting NATS: %w", err)
	}
	s.Start()
	if !s.ReadyForConnections(30 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("starting NATS: not ready after 30s")
	}
	return s, nil
}
