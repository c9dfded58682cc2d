package controllers

import (
	"cmp"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
)

// ErrNATSUnreachable reports that the NATS server of a LoopModel cannot be reached right now.
var ErrNATSUnreachable = errors.New("NATS unreachable")

// NATSPool shares one connection per (URL, credentials) among all LoopModels, so a reconcile
// costs no dial, and keeps each connection reconnecting in the background after an outage.
// The zero value is ready to use; it is safe for concurrent use. Close it when the operator stops.
type NATSPool struct {
	// DialTimeout bounds the first connection attempt (2s when zero).
	DialTimeout time.Duration
	// ReconnectWait is the pause between reconnection attempts (1s when zero).
	ReconnectWait time.Duration
	// IdleClose closes a connection no LoopModel asked for this long, e.g. after its URL
	// changed (30m when zero; keep it above the reconciler's resync period).
	IdleClose time.Duration

	mu     sync.Mutex
	conns  map[string]*pooledConn
	closed bool
}

type pooledConn struct {
	nc       *nats.Conn
	lastUsed time.Time
}

// Conn returns a connected connection to url, authenticating with creds (the content of a NATS
// .creds file) when it is not empty. It fails with ErrNATSUnreachable while the server is down.
func (p *NATSPool) Conn(ctx context.Context, url string, creds []byte) (*nats.Conn, error) {
	sum := sha256.Sum256(creds)
	key := url + "\x00" + string(sum[:])

	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, fmt.Errorf("%w: pool closed", ErrNATSUnreachable)
	}
	now := time.Now()
	for k, pc := range p.conns {
		if k != key && now.Sub(pc.lastUsed) > cmp.Or(p.IdleClose, 30*time.Minute) {
			pc.nc.Close()
			delete(p.conns, k)
		}
	}
	if pc, ok := p.conns[key]; ok {
		pc.lastUsed = now
		switch pc.nc.Status() {
		case nats.CONNECTED:
			return pc.nc, nil
		case nats.CLOSED:
			delete(p.conns, key)
		default:
			// Reconnecting in the background: report the outage now rather than wait for it.
			return nil, fmt.Errorf("%w: %s is %s", ErrNATSUnreachable, url, pc.nc.Status())
		}
	}
	opts := []nats.Option{
		nats.Name("loopserve-operator"),
		nats.Timeout(cmp.Or(p.DialTimeout, 2*time.Second)),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(cmp.Or(p.ReconnectWait, time.Second)),
		// A publish made while reconnecting must fail, not wait in a buffer for minutes.
		nats.ReconnectBufSize(-1),
	}
	if len(creds) > 0 {
		o, err := credsOption(creds)
		if err != nil {
			return nil, err
		}
		opts = append(opts, o)
	}
	if deadline, ok := ctx.Deadline(); ok {
		opts = append(opts, nats.Timeout(min(time.Until(deadline), cmp.Or(p.DialTimeout, 2*time.Second))))
	}
	nc, err := nats.Connect(url, opts...)
	if errors.Is(err, nats.ErrAuthorization) {
		// The server answered: a credentials problem, not an outage.
		return nil, fmt.Errorf("connecting to %s: %w", url, err)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: connecting to %s: %w", ErrNATSUnreachable, url, err)
	}
	if p.conns == nil {
		p.conns = make(map[string]*pooledConn)
	}
	p.conns[key] = &pooledConn{nc: nc, lastUsed: now}
	return nc, nil
}

// Close closes every connection; later calls to Conn fail.
func (p *NATSPool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, pc := range p.conns {
		pc.nc.Close()
		delete(p.conns, k)
	}
	p.closed = true
}

// ErrInvalidCredentials reports a NATS credentials Secret whose content is not a .creds file.
var ErrInvalidCredentials = errors.New("invalid NATS credentials")

// credsOption authenticates with the user JWT and NKey seed of a .creds file held in memory
// (nats.UserCredentials wants a file path, and the Secret is read through the API).
func credsOption(creds []byte) (nats.Option, error) {
	jwt, err := nkeys.ParseDecoratedJWT(creds)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCredentials, err)
	}
	kp, err := nkeys.ParseDecoratedNKey(creds)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCredentials, err)
	}
	seed, err := kp.Seed()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCredentials, err)
	}
	return nats.UserJWTAndSeed(jwt, string(seed)), nil
}

// unreachable reports whether a NATS error means the server (or its JetStream) did not answer,
// as opposed to refusing a request.
func unreachable(err error) bool {
	return errors.Is(err, ErrNATSUnreachable) ||
		errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, nats.ErrConnectionClosed) ||
		errors.Is(err, nats.ErrConnectionReconnecting) ||
		errors.Is(err, nats.ErrDisconnected) ||
		errors.Is(err, jetstream.ErrJetStreamNotEnabled) ||
		errors.Is(err, jetstream.ErrNoHeartbeat)
}
