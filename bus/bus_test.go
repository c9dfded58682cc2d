package bus

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func startJS(t *testing.T) jetstream.JetStream {
	t.Helper()
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(s.Shutdown)
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server not ready")
	}
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

func TestParseRef(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    Ref
		wantErr bool
	}{
		{in: "default/ouro-tiny-arith", want: Ref{"default", "ouro-tiny-arith"}},
		{in: "ns/a", want: Ref{"ns", "a"}},
		{in: "noslash", wantErr: true},
		{in: "Upper/x", wantErr: true},
		{in: "ns/a.b", wantErr: true},
		{in: "ns/", wantErr: true},
		{in: "ns/a*", wantErr: true},
	} {
		got, err := ParseRef(tc.in)
		if (err != nil) != tc.wantErr {
			t.Errorf("ParseRef(%q) error = %v, wantErr %v", tc.in, err, tc.wantErr)
			continue
		}
		if err != nil && !errors.Is(err, ErrInvalidRef) {
			t.Errorf("ParseRef(%q) error %v is not ErrInvalidRef", tc.in, err)
		}
		if !tc.wantErr && got != tc.want {
			t.Errorf("ParseRef(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestNames(t *testing.T) {
	r := Ref{Namespace: "team-a", Name: "ouro-1"}
	got := []string{r.Stream(), r.RequestSubject(), r.StatsSubject(), r.ControlSubject(), r.CancelSubject(), r.Key(), r.String()}
	want := []string{"LOOPSERVE_TEAM-A_OURO-1", "loopserve.req.team-a.ouro-1", "loopserve.stats.team-a.ouro-1",
		"loopserve.ctl.team-a.ouro-1", "loopserve.cancel.team-a.ouro-1", "team-a.ouro-1", "team-a/ouro-1"}
	if d := cmp.Diff(got, want); d != "" {
		t.Errorf("names (-got +want):\n%s", d)
	}
}

func TestEnsureQueueIdempotentAndBounded(t *testing.T) {
	ctx := context.Background()
	js := startJS(t)
	r := Ref{Namespace: "default", Name: "m"}
	o := QueueOptions{MaxQueued: 2, AckWait: 5 * time.Second, MaxAckPending: 3}
	for range 2 {
		if _, err := EnsureQueue(ctx, js, r, o); err != nil {
			t.Fatal(err)
		}
	}
	c, err := EnsureQueue(ctx, js, r, o)
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.CachedInfo().Config
	if cfg.MaxAckPending != 3 || cfg.AckWait != 5*time.Second || cfg.Durable != ConsumerName || cfg.MaxDeliver != DefaultMaxDeliver {
		t.Errorf("consumer config = %+v", cfg)
	}
	if s, err := js.Stream(ctx, r.Stream()); err != nil || s.CachedInfo().Config.MaxAge != DefaultMaxAge {
		t.Errorf("stream MaxAge: %v %v, want %v", err, s.CachedInfo().Config.MaxAge, DefaultMaxAge)
	}
	bound, err := BindQueue(ctx, js, r)
	if err != nil || bound.CachedInfo().Name != ConsumerName {
		t.Errorf("BindQueue: %v", err)
	}
	if _, err := BindQueue(ctx, js, Ref{Namespace: "default", Name: "absent"}); !errors.Is(err, ErrQueueNotFound) {
		t.Errorf("BindQueue of a missing queue: err = %v, want ErrQueueNotFound", err)
	}
	// A full queue refuses new requests instead of dropping old ones.
	for i := range 2 {
		if _, err := js.Publish(ctx, r.RequestSubject(), []byte{byte(i)}); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	if _, err := js.Publish(ctx, r.RequestSubject(), []byte("x")); err == nil {
		t.Error("publish into a full queue succeeded")
	}
	// Nats-Msg-Id dedupe.
	s, _ := js.Stream(ctx, r.Stream())
	info, _ := s.Info(ctx)
	if info.State.Msgs != 2 {
		t.Errorf("stream holds %d messages, want 2", info.State.Msgs)
	}
	if err := DeleteQueue(ctx, js, r); err != nil {
		t.Fatal(err)
	}
	if err := DeleteQueue(ctx, js, r); err != nil {
		t.Errorf("deleting a missing queue: %v", err)
	}
}

func TestRegistryRoundTrip(t *testing.T) {
	ctx := context.Background()
	js := startJS(t)
	// Gateways and workers never create the buckets: binding before the operator made them fails.
	for _, open := range []func(context.Context, jetstream.JetStream) (jetstream.KeyValue, error){OpenRegistry, OpenGateways} {
		if _, err := open(ctx, js); !errors.Is(err, ErrRegistryNotFound) {
			t.Errorf("binding to a missing bucket: err = %v, want ErrRegistryNotFound", err)
		}
	}
	if _, err := js.KeyValue(ctx, RegistryBucket); !errors.Is(err, jetstream.ErrBucketNotFound) {
		t.Errorf("a bind created the bucket: %v", err)
	}
	kv, err := EnsureRegistry(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := EnsureRegistry(ctx, js, 0); err != nil { // idempotent
		t.Fatal(err)
	}
	gw, err := OpenGateways(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := gw.Status(ctx); err != nil || st.TTL() != GatewayTTL {
		t.Errorf("gateways bucket: %v, TTL %v, want %v", err, st.TTL(), GatewayTTL)
	}
	if _, err := OpenRegistry(ctx, js); err != nil {
		t.Fatal(err)
	}
	e := ModelEntry{Namespace: "default", Name: "m", ContextLength: 2048, MaxSteps: 4, Ready: true,
		Thresholds: Thresholds{ExitThreshold: 0.8, DefaultTier: "standard", Tiers: map[string]float64{"gold": 0.9, "standard": 0.8, "batch": 0.6}},
		Updated:    time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	if err := PutModel(ctx, kv, e); err != nil {
		t.Fatal(err)
	}
	got, err := kv.Get(ctx, "default.m")
	if err != nil {
		t.Fatal(err)
	}
	dec, err := DecodeModel(got.Value())
	if err != nil {
		t.Fatal(err)
	}
	e.Subject = "loopserve.req.default.m"
	if d := cmp.Diff(dec, e); d != "" {
		t.Errorf("entry (-got +want):\n%s", d)
	}
	// An entry from an operator that knows no tiers still decodes; a broken tier map does not.
	if old, err := DecodeModel([]byte(`{"namespace":"default","name":"m","exitThreshold":0.9}`)); err != nil || old.ExitThreshold != 0.9 || old.Tiers != nil {
		t.Errorf("entry without tiers: %+v, %v", old, err)
	}
	if _, err := DecodeModel([]byte(`{"namespace":"default","name":"m","exitThreshold":0.9,"defaultTier":"gold","tiers":{"gold":0.9,"batch":0}}`)); err == nil || !strings.Contains(err.Error(), `tier "batch"`) {
		t.Errorf("entry with a zero tier threshold: err = %v, want one naming the tier", err)
	}
	if err := PutModel(ctx, kv, ModelEntry{Namespace: "Bad", Name: "m"}); !errors.Is(err, ErrInvalidRef) {
		t.Errorf("invalid entry: err = %v, want ErrInvalidRef", err)
	}
	if err := DeleteModel(ctx, kv, e.Ref()); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Get(ctx, "default.m"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("after delete: %v", err)
	}
}

func TestParseReply(t *testing.T) {
	for _, tc := range []struct {
		in      string
		gateway string
	}{
		{in: ReplySubject("gw1", "cmpl-0a1b"), gateway: "gw1"},
		{in: "loopserve.inbox.g_2-x.chatcmpl-ff", gateway: "g_2-x"},
		{in: "loopserve.inbox.gw1"},
		{in: "loopserve.inbox.gw1.req.extra"},
		{in: "loopserve.inbox.*.req"},
		{in: "loopserve.inbox.gw1.>"},
		{in: "loopserve.inbox..req"},
		{in: "$JS.API.STREAM.DELETE.LOOPSERVE_DEFAULT_M"},
		{in: "_INBOX.abc.def"},
		{in: "loopserve.req.default.m"},
		{in: ""},
	} {
		gw, req, err := ParseReply(tc.in)
		switch {
		case tc.gateway == "" && !errors.Is(err, ErrInvalidReply):
			t.Errorf("ParseReply(%q) = %q, %v; want ErrInvalidReply", tc.in, gw, err)
		case tc.gateway != "" && (err != nil || gw != tc.gateway || tc.in != ReplySubject(gw, req)):
			t.Errorf("ParseReply(%q) = %q, %q, %v; want gateway %q", tc.in, gw, req, err, tc.gateway)
		}
	}
}

func TestDecodeMaxDeliveries(t *testing.T) {
	in := `{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x","timestamp":"2026-01-02T03:04:05Z","stream":"LOOPSERVE_DEFAULT_M","consumer":"workers","stream_seq":42,"deliveries":5}`
	got, err := DecodeMaxDeliveries([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(got, MaxDeliveries{Stream: "LOOPSERVE_DEFAULT_M", Consumer: "workers", StreamSeq: 42, Deliveries: 5}); d != "" {
		t.Errorf("advisory (-got +want):\n%s", d)
	}
	for _, bad := range []string{`{}`, `{"stream":"S"}`, `nope`} {
		if _, err := DecodeMaxDeliveries([]byte(bad)); err == nil {
			t.Errorf("DecodeMaxDeliveries(%s) succeeded", bad)
		}
	}
}

func TestDecodeControl(t *testing.T) {
	tiers := map[string]float64{"gold": 0.9, "standard": 0.8, "batch": 0.5}
	for _, tc := range []struct {
		in      string
		want    Thresholds
		wantErr string
	}{
		{in: `{"exitThreshold":0.7}`, want: Thresholds{ExitThreshold: 0.7}},
		{in: `{"exitThreshold":1}`, want: Thresholds{ExitThreshold: 1}},
		{in: `{"exitThreshold":0.8,"defaultTier":"standard","tiers":{"gold":0.9,"standard":0.8,"batch":0.5}}`,
			want: Thresholds{ExitThreshold: 0.8, DefaultTier: "standard", Tiers: tiers}},
		{in: `{"exitThreshold":0}`, wantErr: "exitThreshold 0 outside (0, 1]"},
		{in: `{"exitThreshold":1.5}`, wantErr: "exitThreshold 1.5 outside (0, 1]"},
		{in: `{}`, wantErr: "exitThreshold 0 outside (0, 1]"},
		{in: `nope`, wantErr: "invalid character"},
		{in: `{"exitThreshold":0.8,"defaultTier":"standard","tiers":{"standard":0.8,"batch":1.2}}`, wantErr: `tier "batch": exitThreshold 1.2 outside (0, 1]`},
		{in: `{"exitThreshold":0.8,"defaultTier":"standard","tiers":{"standard":0.8,"batch":-1}}`, wantErr: `tier "batch": exitThreshold -1 outside (0, 1]`},
		{in: `{"exitThreshold":0.8,"defaultTier":"silver","tiers":{"standard":0.8}}`, wantErr: `defaultTier "silver" is not one of the tiers [standard]`},
		{in: `{"exitThreshold":0.7,"defaultTier":"standard","tiers":{"standard":0.8}}`, wantErr: `differs from the default tier "standard"'s 0.8`},
		{in: `{"exitThreshold":0.8,"defaultTier":"Std","tiers":{"Std":0.8}}`, wantErr: `tier name "Std" is not a DNS label`},
		{in: `{"exitThreshold":0.8,"defaultTier":"standard"}`, wantErr: `defaultTier "standard" without tiers`},
	} {
		got, err := DecodeControl([]byte(tc.in))
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("DecodeControl(%s) error = %v, want one containing %q", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("DecodeControl(%s): %v", tc.in, err)
			continue
		}
		if d := cmp.Diff(got.Thresholds, tc.want); d != "" {
			t.Errorf("DecodeControl(%s) (-got +want):\n%s", tc.in, d)
		}
	}
}

func TestThresholdOfTier(t *testing.T) {
	tiered := Thresholds{ExitThreshold: 0.8, DefaultTier: "standard", Tiers: map[string]float64{"gold": 0.9, "standard": 0.8, "batch": 0.5}}
	plain := Thresholds{ExitThreshold: 0.7}
	for _, tc := range []struct {
		th       Thresholds
		tier     string
		wantName string
		wantTau  float64
		wantErr  string
	}{
		{tiered, "", "standard", 0.8, ""},
		{tiered, "gold", "gold", 0.9, ""},
		{tiered, "batch", "batch", 0.5, ""},
		{tiered, "silver", "", 0, `unknown quality tier "silver": known tiers are [batch gold standard]`},
		{plain, "", "", 0.7, ""},
		{plain, "gold", "", 0, `unknown quality tier "gold": the model declares no tiers`},
	} {
		name, tau, err := tc.th.Threshold(tc.tier)
		if tc.wantErr != "" {
			if !errors.Is(err, ErrUnknownTier) || err.Error() != tc.wantErr {
				t.Errorf("Threshold(%q) error = %v, want ErrUnknownTier %q", tc.tier, err, tc.wantErr)
			}
			continue
		}
		if err != nil || name != tc.wantName || tau != tc.wantTau {
			t.Errorf("Threshold(%q) = %q, %v, %v; want %q, %v", tc.tier, name, tau, err, tc.wantName, tc.wantTau)
		}
	}
	if !tiered.Equal(Thresholds{ExitThreshold: 0.8 + 1e-12, DefaultTier: "standard", Tiers: map[string]float64{"gold": 0.9, "standard": 0.8, "batch": 0.5}}) {
		t.Error("thresholds equal within 1e-9 compare unequal")
	}
	if tiered.Equal(Thresholds{ExitThreshold: 0.8, DefaultTier: "standard", Tiers: map[string]float64{"gold": 0.9, "standard": 0.8, "batch": 0.55}}) {
		t.Error("a changed tier threshold compares equal")
	}
}

// TestStatsPerTierRoundTrip: a snapshot with the default tier and two others survives the wire
// and becomes one policy sample per tier, each under its own threshold with its own counts.
func TestStatsPerTierRoundTrip(t *testing.T) {
	const R = 3
	r := Ref{"default", "m"}
	s := NewStatsSnapshot(r, "w1", R)
	s.Start, s.End = time.Unix(100, 0).UTC(), time.Unix(105, 0).UTC()
	s.Capacity, s.InFlight, s.BusySeconds = 8, 3, 4.5
	s.Tier, s.ExitThreshold, s.Tokens, s.LoopSteps = "standard", 0.8, 10, 25
	s.DepthCounts[2] = 10
	batch := NewTierStats("batch", R)
	batch.ExitThreshold, batch.Tokens, batch.LoopSteps, batch.TokenLatencyP95 = 0.5, 40, 60, 0.02
	batch.DepthCounts[0], batch.DepthCounts[1] = 20, 20
	batch.Probes, batch.ProbeAgree = 2, []int64{1, 2, 2}
	gold := NewTierStats("gold", R)
	gold.ExitThreshold, gold.Tokens, gold.LoopSteps = 0.9, 1, 3
	s.Tiers = []TierStats{batch, gold}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	back, err := DecodeStats(b)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(back, s); d != "" {
		t.Errorf("snapshot after the wire (-got +want):\n%s", d)
	}
	type row struct {
		Tier               string
		Tau                float64
		Tokens, LoopSteps  int64
		Capacity, InFlight int
		Busy               float64
	}
	var got []row
	for _, p := range back.Samples() {
		if err := p.Validate(); err != nil {
			t.Errorf("sample of tier %q: %v", p.Tier, err)
		}
		got = append(got, row{p.Tier, p.ExitThreshold, p.Tokens, p.LoopSteps, p.Capacity, p.InFlight, p.BusySeconds})
	}
	want := []row{{"standard", 0.8, 10, 25, 8, 3, 4.5}, {"batch", 0.5, 40, 60, 8, 3, 0}, {"gold", 0.9, 1, 3, 8, 3, 0}}
	if d := cmp.Diff(got, want); d != "" {
		t.Errorf("samples (-got +want):\n%s", d)
	}
	if got, want := back.Tiers[0].MeanDepth(), 1.5; got != want {
		t.Errorf("batch mean depth = %v, want %v", got, want)
	}

	// A snapshot naming one tier twice, or a tier with short arrays, is refused.
	dup := s
	dup.Tiers = []TierStats{batch, batch}
	short := s
	bad := NewTierStats("batch", R-1)
	short.Tiers = []TierStats{bad}
	for name, snap := range map[string]StatsSnapshot{"tier twice": dup, "short arrays": short} {
		b, _ := json.Marshal(snap)
		if _, err := DecodeStats(b); !errors.Is(err, ErrInvalidStats) {
			t.Errorf("%s: err = %v, want ErrInvalidStats", name, err)
		}
	}
}

// TestStatsPredictDepth builds a window from known per-token c_t and checks the depth prediction
// against a direct count of Q-exit depths.
func TestStatsPredictDepth(t *testing.T) {
	const R = 4
	// Each row: c_1..c_4 of one token (c_4 = 1).
	tokens := [][]float64{
		{0.95, 0.99, 1, 1},
		{0.10, 0.55, 0.85, 1},
		{0.20, 0.30, 0.60, 1},
		{0.72, 0.80, 0.97, 1},
	}
	depthAt := func(c []float64, tau float64) int {
		for i, v := range c {
			if v >= tau {
				return i + 1
			}
		}
		return len(c)
	}
	const inForce = 0.75
	s := NewStatsSnapshot(Ref{"default", "m"}, "w", R)
	s.ExitThreshold = inForce
	for i, c := range tokens {
		d := depthAt(c, inForce)
		s.DepthCounts[d-1]++
		probe := i == 1 || i == 2 || i == 3 // token 0 is a plain token, censored after step 1
		for t := range R {
			if t < d {
				s.Cum[t][CumBin(c[t])]++
			} else {
				s.Censored[t]++
			}
			if probe {
				s.ProbeCum[t][CumBin(c[t])]++
			}
		}
		if probe {
			s.Probes++
		}
	}
	for _, tau := range []float64{0.5, 0.75} { // at or below the threshold in force: exact from all tokens
		var want float64
		for _, c := range tokens {
			want += float64(depthAt(c, tau))
		}
		want /= float64(len(tokens))
		if got := s.PredictDepth(tau); math.Abs(got-want) > 1e-9 {
			t.Errorf("PredictDepth(%v) = %v, want %v", tau, got, want)
		}
	}
	// Above it only probes count.
	var want float64
	for _, c := range tokens[1:] {
		want += float64(depthAt(c, 0.9))
	}
	want /= 3
	if got := s.PredictDepth(0.9); math.Abs(got-want) > 1e-9 {
		t.Errorf("PredictDepth(0.9) = %v, want %v (probes only)", got, want)
	}
	if got, want := s.MeanDepth(), (1+3+4+2)/4.0; math.Abs(got-want) > 1e-9 {
		t.Errorf("MeanDepth = %v, want %v", got, want)
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	back, err := DecodeStats(b)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(back, s); d != "" {
		t.Errorf("round trip (-got +want):\n%s", d)
	}
	bad := s
	bad.Censored = bad.Censored[:2]
	if err := bad.Validate(); !errors.Is(err, ErrInvalidStats) {
		t.Errorf("short array: err = %v, want ErrInvalidStats", err)
	}
}

func TestCumBin(t *testing.T) {
	for _, tc := range []struct {
		c    float64
		want int
	}{{0, 0}, {-1, 0}, {math.NaN(), 0}, {0.5, 50}, {0.499, 49}, {1, CumBins - 1}, {2, CumBins - 1}} {
		if got := CumBin(tc.c); got != tc.want {
			t.Errorf("CumBin(%v) = %d, want %d", tc.c, got, tc.want)
		}
	}
}
