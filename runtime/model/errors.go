package model

import "errors"

// Errors callers can test with errors.Is; the wrapping error names the file, tensor and the
// expected and found values.
var (
	ErrConfig           = errors.New("invalid model config")
	ErrBadHeader        = errors.New("bad safetensors header")
	ErrHeaderTooLarge   = errors.New("safetensors header too large")
	ErrTruncated        = errors.New("truncated safetensors file")
	ErrDType            = errors.New("unsupported dtype")
	ErrShape            = errors.New("tensor shape mismatch")
	ErrMissingTensor    = errors.New("missing tensor")
	ErrUnexpectedTensor = errors.New("unexpected tensor")
	ErrIndex            = errors.New("bad safetensors index")
)
