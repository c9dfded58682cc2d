//go:build !unix

package model

import (
	"errors"
	"os"
)

// mmap is unavailable here: OpenSafetensors reads the file into memory instead.
func mmap(*os.File, int) ([]byte, error) { return nil, errors.ErrUnsupported }

func munmap([]byte) error { return nil }
