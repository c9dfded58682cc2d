package serve

import (
	"testing"
	"time"

	"pgregory.net/rapid"
)

func TestEstimateWait(t *testing.T) {
	for _, tc := range []struct {
		name    string
		q       queueState
		service time.Duration
		wait    time.Duration
		known   bool
	}{
		{"nothing measured", queueState{Waiting: 50, Running: 8}, 0, 0, false},
		{"nobody waiting", queueState{Waiting: 0, Running: 8}, time.Second, 0, true},
		{"8 waiting, 8 running, 1s each", queueState{Waiting: 8, Running: 8}, time.Second, time.Second, true},
		{"16 waiting, 4 running, 2s each", queueState{Waiting: 16, Running: 4}, 2 * time.Second, 8 * time.Second, true},
		{"waiting, nothing running", queueState{Waiting: 3, Running: 0}, time.Second, 3 * time.Second, true},
	} {
		wait, known := estimateWait(tc.q, tc.service)
		if wait != tc.wait || known != tc.known {
			t.Errorf("%s: estimateWait = %s, %v; want %s, %v", tc.name, wait, known, tc.wait, tc.known)
		}
	}
	for _, tc := range []struct {
		q       queueState
		service time.Duration
		ok      bool
		retry   time.Duration
	}{
		{queueState{Waiting: 10, Running: 1}, time.Second, false, 8 * time.Second}, // 10s wait + 1s service against 3s
		{queueState{Waiting: 1, Running: 1}, time.Second, true, 0},
		{queueState{Waiting: 100, Running: 1}, 0, true, 0}, // no estimate yet: only a full queue refuses
	} {
		ok, retry := admit(tc.q, tc.service, 3*time.Second)
		if ok != tc.ok || retry != tc.retry {
			t.Errorf("admit(%+v, %s, 3s) = %v, %s; want %v, %s", tc.q, tc.service, ok, retry, tc.ok, tc.retry)
		}
	}
}

// TestAdmitProperties: the estimate grows with the queue and shrinks with the workers running;
// a refusal always advises a positive Retry-After that would make the request fit; a request
// that fits its timeout is admitted.
func TestAdmitProperties(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		q := queueState{Waiting: rapid.IntRange(0, 100000).Draw(t, "waiting"), Running: rapid.IntRange(0, 4096).Draw(t, "running")}
		service := time.Duration(rapid.Int64Range(1, int64(time.Hour)).Draw(t, "service"))
		timeout := time.Duration(rapid.Int64Range(int64(time.Second), int64(time.Hour)).Draw(t, "timeout"))
		wait, known := estimateWait(q, service)
		if !known || wait < 0 {
			t.Fatalf("estimateWait(%+v, %s) = %s, %v", q, service, wait, known)
		}
		more := q
		more.Waiting++
		if w2, _ := estimateWait(more, service); w2 < wait {
			t.Fatalf("one more waiting shortens the wait: %s < %s", w2, wait)
		}
		faster := q
		faster.Running++
		if w2, _ := estimateWait(faster, service); w2 > wait {
			t.Fatalf("one more running lengthens the wait: %s > %s", w2, wait)
		}
		ok, retry := admit(q, service, timeout)
		switch {
		case ok && wait+service > timeout:
			t.Fatalf("admitted with wait %s + service %s over timeout %s", wait, service, timeout)
		case !ok && wait+service <= timeout:
			t.Fatalf("refused with wait %s + service %s within timeout %s", wait, service, timeout)
		case !ok && (retry <= 0 || wait+service-retry > timeout):
			t.Fatalf("refused with Retry-After %s: waiting that long leaves %s > %s", retry, wait+service-retry, timeout)
		}
	})
}
