package engine

import "errors"

// Errors callers map: ErrInvalidRequest (HTTP 400) wraps every reason a request is refused;
// ErrInvalidOptions a bad engine configuration; ErrStopped a request cut short because the
// engine's Run ended; ErrClosed a Submit after Run ended; ErrKVFull a prompt that the KV
// budget (Options.MaxKVBytes) cannot hold (a submitted one waits while others hold memory).
var (
	ErrInvalidRequest = errors.New("invalid request")
	ErrInvalidOptions = errors.New("invalid engine options")
	ErrStopped        = errors.New("engine stopped")
	ErrClosed         = errors.New("engine closed")
	ErrKVFull         = errors.New("KV cache budget exhausted")
)
