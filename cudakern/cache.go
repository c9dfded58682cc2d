package cudakern

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Cache keeps compiled kernel images on disk, keyed by everything that decides their bytes:
// the source and headers, the options, the target and the NVRTC version. A hit skips NVRTC at
// start-up. Entries carry a checksum; a damaged one is a miss (and is rewritten). Safe for
// concurrent use, also by several processes: entries are written to a temporary file and
// renamed into place.
type Cache struct {
	Dir string // "" disables the cache
}

// CacheEnv names the environment variable that overrides the cache folder.
const CacheEnv = "LOOPSERVE_CUDA_CACHE"

// DefaultCache is $LOOPSERVE_CUDA_CACHE, else loopserve/cudakern in the user's cache folder
// ($XDG_CACHE_HOME or ~/.cache); with neither, no cache.
func DefaultCache() *Cache {
	if d := os.Getenv(CacheEnv); d != "" {
		return &Cache{Dir: d}
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return &Cache{}
	}
	return &Cache{Dir: filepath.Join(d, "loopserve", "cudakern")}
}

// cacheFormat changes when the entry layout or the key's fields change.
const cacheFormat = "cudakern-cache-1"

// CacheKey is the hex SHA-256 of the compile inputs, each length-prefixed so that no two
// different inputs hash the same bytes.
func CacheKey(nvrtcMajor, nvrtcMinor int, unit Unit, headers []Header, t Target, options []string) string {
	h := sha256.New()
	put := func(s string) {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(s)))
		h.Write(n[:])
		h.Write([]byte(s))
	}
	put(cacheFormat)
	put(fmt.Sprintf("nvrtc %d.%d", nvrtcMajor, nvrtcMinor))
	put(t.String())
	put(unit.Name)
	put(unit.Source)
	put(fmt.Sprint(len(headers)))
	for _, hd := range headers {
		put(hd.Name)
		put(hd.Source)
	}
	put(fmt.Sprint(len(options)))
	for _, o := range options {
		put(o)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func (c *Cache) path(key string) string { return filepath.Join(c.Dir, key+".img") }

// Load returns the image stored under key, or false when there is none (or it is damaged).
func (c *Cache) Load(key string) ([]byte, bool) {
	if c == nil || c.Dir == "" {
		return nil, false
	}
	b, err := os.ReadFile(c.path(key))
	if err != nil || len(b) < sha256.Size {
		return nil, false
	}
	img, sum := b[:len(b)-sha256.Size], b[len(b)-sha256.Size:]
	if got := sha256.Sum256(img); !bytes.Equal(got[:], sum) {
		return nil, false
	}
	return img, true
}

// Store writes img under key (creating the folder). A cache that cannot be written is an
// error the caller may ignore: the image is still good.
func (c *Cache) Store(key string, img []byte) error {
	if c == nil || c.Dir == "" {
		return nil
	}
	if err := os.MkdirAll(c.Dir, 0o755); err != nil {
		return fmt.Errorf("kernel cache: %w", err)
	}
	tmp, err := os.CreateTemp(c.Dir, key+".*.tmp")
	if err != nil {
		return fmt.Errorf("kernel cache: %w", err)
	}
	sum := sha256.Sum256(img)
	_, werr := tmp.Write(append(img[:len(img):len(img)], sum[:]...))
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr); err != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("kernel cache: writing %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), c.path(key)); err != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("kernel cache: %w", err)
	}
	return nil
}
