package keystore

// Temporary: replaced by the real implementations of the lifecycle methods.

import (
	"context"
	"errors"
	"time"
)

var errTODO = errors.New("keystore: not implemented yet")

func (s *RedisStore) Update(context.Context, string, func(*Key) error) (*Key, error) {
	return nil, errTODO
}
func (s *RedisStore) RecordUsage(context.Context, map[string]time.Time) error { return errTODO }
func (s *RedisStore) CountOwner(context.Context, string) (int, error)         { return 0, errTODO }
func (s *BoltStore) Update(context.Context, string, func(*Key) error) (*Key, error) {
	return nil, errTODO
}
func (s *BoltStore) RecordUsage(context.Context, map[string]time.Time) error { return errTODO }
func (s *BoltStore) CountOwner(context.Context, string) (int, error)         { return 0, errTODO }
