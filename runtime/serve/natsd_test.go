package serve

import "testing"

// TestStartNATSSyncsAlways: the embedded JetStream fsyncs every write; the default periodic
// flush loses acknowledged requests on a crash.
func TestStartNATSSyncsAlways(t *testing.T) {
	s, err := StartNATS(NATSOptions{StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Shutdown(); s.WaitForShutdown() }()
	cfg := s.JetStreamConfig()
	if cfg == nil || !cfg.SyncAlways {
		t.Errorf("JetStream config %+v, want SyncAlways", cfg)
	}
	if _, err := StartNATS(NATSOptions{}); err == nil {
		t.Error("StartNATS without a store directory: no error")
	}
}
