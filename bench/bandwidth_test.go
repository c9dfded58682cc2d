package bench

import (
	"context"
	"os"
	"testing"
)

func TestSumWords(t *testing.T) {
	for _, n := range []int{0, 8, 16, 24, 40, 1000, 4096 + 8} {
		p := make([]uint64, n)
		var want uint64
		for i := range p {
			p[i] = uint64(i)*0x9e3779b97f4a7c15 + 7
			want += p[i]
		}
		if got := sumWords(p); got != want {
			t.Errorf("sumWords(len %d) = %d, want %d", n, got, want)
		}
		if got := sumWordsGo(p); got != want {
			t.Errorf("sumWordsGo(len %d) = %d, want %d", n, got, want)
		}
	}
}

func TestMeasureBandwidth(t *testing.T) {
	const size = 8 << 20
	bw, err := MeasureBandwidth(context.Background(), size, 3)
	if err != nil {
		t.Fatal(err)
	}
	if bw.Passes != 3 || bw.Bytes <= 0 || bw.Bytes > size || bw.Best <= 0 || bw.GBPerSec() <= 0 {
		t.Errorf("MeasureBandwidth = %+v (%.2f GB/s), want 3 passes over at most %d bytes and a positive rate", bw, bw.GBPerSec(), size)
	}
	if _, err := MeasureBandwidth(context.Background(), 0, 1); err == nil {
		t.Error("MeasureBandwidth(size 0) returned no error")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := MeasureBandwidth(ctx, size, 1); err == nil {
		t.Error("MeasureBandwidth(cancelled) returned no error")
	}
}

func BenchmarkSumWords(b *testing.B) {
	p := make([]uint64, 1<<28/8) // 256 MiB
	b.SetBytes(int64(len(p) * 8))
	for b.Loop() {
		sumWords(p)
	}
}

func TestLastLevelCache(t *testing.T) {
	llc := LastLevelCache()
	if _, err := os.Stat("/sys/devices/system/cpu/cpu0/cache/index0/size"); err != nil {
		t.Skipf("no cache information in sysfs: %v", err)
	}
	if llc < 16<<10 {
		t.Errorf("LastLevelCache() = %d bytes, want at least an L1's 16 KiB", llc)
	}
}

func TestProbeStream(t *testing.T) {
	p, err := NewProbe(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	size := p.Size()
	if size <= 0 || size > 1<<20 || size%int64(64*len(p.parts)) != 0 {
		t.Fatalf("Size() = %d, want whole cache lines per worker within 1 MiB", size)
	}
	// A stream longer than the buffer wraps around it; one shorter continues where the last ended.
	for _, bytes := range []int64{3 * size, size / 3, size, 1} {
		per := bytes / 8 / int64(len(p.parts)) / 8 * 8
		start := p.next
		read, d := p.Stream(bytes)
		if want := per * 8 * int64(len(p.parts)); read != want {
			t.Errorf("Stream(%d) read %d bytes, want %d", bytes, read, want)
		}
		if read > 0 && d <= 0 {
			t.Errorf("Stream(%d) took %v, want a positive duration", bytes, d)
		}
		if want := (start + per) % int64(len(p.parts[0])); p.next != want {
			t.Errorf("after Stream(%d) next = %d, want %d", bytes, p.next, want)
		}
	}
	// The sums are of the filled words: a whole pass of every worker adds each part's sum.
	p.next, p.sink = 0, 0
	var want uint64
	for _, part := range p.parts {
		for _, v := range part {
			want += v
		}
	}
	p.Stream(size)
	if p.sink != want {
		t.Errorf("one pass summed %d, want %d", p.sink, want)
	}
	if _, err := NewProbe(0); err == nil {
		t.Error("NewProbe(0) returned no error")
	}
	if _, err := p.Measure(t.Context(), 0); err == nil {
		t.Error("Measure(0 passes) returned no error")
	}
}
