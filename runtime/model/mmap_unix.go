//go:build unix

package model

import (
	"os"
	"syscall"
)

// mmap maps a file read-only: weights are paged in on demand and shared with other processes
// serving the same checkpoint.
func mmap(f *os.File, size int) ([]byte, error) {
	return syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ, syscall.MAP_SHARED)
}

func munmap(b []byte) error { return syscall.Munmap(b) }
