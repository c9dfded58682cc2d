package controllers

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// TestNATSPool: one shared connection per URL; a server outage is reported at once as
// ErrNATSUnreachable while the connection reconnects; idle connections are closed.
func TestNATSPool(t *testing.T) {
	ctx := context.Background()
	a, b := startNATS(t), startNATS(t)
	p := &NATSPool{ReconnectWait: 50 * time.Millisecond, IdleClose: 200 * time.Millisecond}
	defer p.Close()

	c1, err := p.Conn(ctx, a.url(), nil)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := p.Conn(ctx, a.url(), nil)
	if err != nil || c2 != c1 {
		t.Fatalf("second Conn = %p, %v; want the shared %p", c2, err, c1)
	}

	a.stop()
	await(t, waitLong, "outage reported", func() error {
		_, err := p.Conn(ctx, a.url(), nil)
		if !errors.Is(err, ErrNATSUnreachable) {
			return errors.New("no ErrNATSUnreachable yet")
		}
		return nil
	})
	a.start()
	await(t, waitLong, "reconnected", func() error {
		c, err := p.Conn(ctx, a.url(), nil)
		if err != nil {
			return err
		}
		if c != c1 {
			t.Errorf("after the outage got a new connection; want the same one reconnected")
		}
		return nil
	})

	// Only b is used from now on: a's connection is closed once idle.
	time.Sleep(250 * time.Millisecond) // let a's connection age past IdleClose
	if _, err := p.Conn(ctx, b.url(), nil); err != nil {
		t.Fatal(err)
	}
	if s := c1.Status(); s != nats.CLOSED {
		t.Errorf("idle connection status = %v, want CLOSED", s)
	}

	if _, err := p.Conn(ctx, "nats://127.0.0.1:1", nil); !errors.Is(err, ErrNATSUnreachable) {
		t.Errorf("dialling a closed port: err = %v, want ErrNATSUnreachable", err)
	}
	if _, err := p.Conn(ctx, b.url(), []byte("garbage")); !errors.Is(err, ErrInvalidCredentials) {
		t.Errorf("garbage credentials: err = %v, want ErrInvalidCredentials", err)
	}
}
