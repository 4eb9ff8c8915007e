package jwtauth

import (
	"errors"
	"fmt"
	"maps"
	"strings"

	"github.com/golang-jwt/jwt/v5"
)

// SignHMAC signs claims with secret using alg (HS256, HS384 or HS512) and
// returns the compact JWT. It refuses secrets shorter than MinSecretLength
// bytes and any other algorithm. It adds no claims: to be accepted by a
// Verifier the claims need at least `exp` and the owner claim. Errors never
// contain the secret.
func SignHMAC(secret []byte, alg string, claims map[string]any) (string, error) {
	if len(secret) < MinSecretLength {
		return "", fmt.Errorf("jwtauth: HMAC secret must be at least %d bytes (got %d)", MinSecretLength, len(secret))
	}
	var method jwt.SigningMethod
	switch alg {
	case "HS256":
		method = jwt.SigningMethodHS256
	case "HS384":
		method = jwt.SigningMethodHS384
	case "HS512":
		method = jwt.SigningMethodHS512
	default:
		return "", fmt.Errorf("jwtauth: SignHMAC supports only %s (got %q)", strings.Join(hmacAlgs, ", "), alg)
	}
	mc := make(jwt.MapClaims, len(claims))
	maps.Copy(mc, claims)
	token, err := jwt.NewWithClaims(method, mc).SignedString(secret)
	if err != nil {
		// golang-jwt's errors here concern claim encoding, never the key;
		// still, report only the kind of failure.
		return "", errors.New("jwtauth: cannot sign token: claims are not JSON-encodable")
	}
	return token, nil
}
