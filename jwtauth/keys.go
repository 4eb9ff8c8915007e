package jwtauth

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"slices"
	"strings"
)

// minRSABits is the smallest RSA modulus accepted in PublicKeyPEM.
const minRSABits = 2048

type keyKind int

const (
	kindHMAC keyKind = iota + 1
	kindRSA
	kindECDSA
	kindEd25519
	kindJWKS
)

func (k keyKind) String() string {
	switch k {
	case kindHMAC:
		return "an HMAC secret"
	case kindRSA:
		return "an RSA public key"
	case kindECDSA:
		return "this ECDSA public key"
	case kindEd25519:
		return "an Ed25519 public key"
	case kindJWKS:
		return "a JWKS"
	}
	return "this key"
}

var (
	hmacAlgs       = []string{"HS256", "HS384", "HS512"}
	rsaAlgs        = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
	ecdsaAlgs      = []string{"ES256", "ES384", "ES512"}
	asymmetricAlgs = slices.Concat(rsaAlgs, ecdsaAlgs, []string{"EdDSA"})
	knownAlgs      = slices.Concat(hmacAlgs, asymmetricAlgs)
)

// resolveAlgorithms validates the configured allowlist against what the key
// source can verify, or returns the default (everything it can verify).
func resolveAlgorithms(requested []string, kind keyKind, capable []string) ([]string, error) {
	if len(requested) == 0 {
		return slices.Clone(capable), nil
	}
	out := make([]string, 0, len(requested))
	for _, alg := range requested {
		switch {
		case alg == "":
			return nil, configErrorf("Algorithms contains an empty name")
		case strings.EqualFold(alg, "none"):
			return nil, configErrorf(`algorithm "none" (unsigned tokens) is never allowed`)
		case !slices.Contains(knownAlgs, alg):
			return nil, configErrorf("unknown algorithm %q (known, case-sensitive: %s)", alg, strings.Join(knownAlgs, ", "))
		case kind != kindHMAC && slices.Contains(hmacAlgs, alg):
			return nil, configErrorf("algorithm %s needs an HMAC Secret and cannot be used with %s (algorithm confusion)", alg, kind)
		case !slices.Contains(capable, alg):
			return nil, configErrorf("algorithm %s cannot be verified with %s (supported: %s)", alg, kind, strings.Join(capable, ", "))
		}
		if !slices.Contains(out, alg) {
			out = append(out, alg)
		}
	}
	return out, nil
}

// parsePublicKeyPEM reads the first PEM block of data and returns the public
// key, its kind and the algorithms it can verify. Errors never include key
// material.
func parsePublicKeyPEM(data []byte) (any, keyKind, []string, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, 0, nil, configErrorf("PublicKeyPEM contains no PEM block")
	}
	var (
		key any
		err error
	)
	switch block.Type {
	case "PUBLIC KEY":
		key, err = x509.ParsePKIXPublicKey(block.Bytes)
	case "RSA PUBLIC KEY":
		key, err = x509.ParsePKCS1PublicKey(block.Bytes)
	case "CERTIFICATE":
		var cert *x509.Certificate
		if cert, err = x509.ParseCertificate(block.Bytes); err == nil {
			key = cert.PublicKey
		}
	default:
		if strings.Contains(block.Type, "PRIVATE KEY") {
			return nil, 0, nil, configErrorf("PublicKeyPEM holds a private key (%q); configure the public key only", block.Type)
		}
		return nil, 0, nil, configErrorf(`PublicKeyPEM block type %q is not supported (want "PUBLIC KEY", "RSA PUBLIC KEY" or "CERTIFICATE")`, block.Type)
	}
	if err != nil {
		return nil, 0, nil, configErrorf("PublicKeyPEM %q block cannot be parsed", block.Type)
	}

	switch k := key.(type) {
	case *rsa.PublicKey:
		if bits := k.N.BitLen(); bits < minRSABits {
			return nil, 0, nil, configErrorf("RSA public key is %d bits; at least %d are required", bits, minRSABits)
		}
		return k, kindRSA, rsaAlgs, nil
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return k, kindECDSA, []string{"ES256"}, nil
		case elliptic.P384():
			return k, kindECDSA, []string{"ES384"}, nil
		case elliptic.P521():
			return k, kindECDSA, []string{"ES512"}, nil
		}
		return nil, 0, nil, configErrorf("ECDSA curve %s is not supported (want P-256, P-384 or P-521)", k.Curve.Params().Name)
	case ed25519.PublicKey:
		return k, kindEd25519, []string{"EdDSA"}, nil
	}
	return nil, 0, nil, configErrorf("PublicKeyPEM holds an unsupported key type %T (want RSA, ECDSA or Ed25519)", key)
}
