package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protowire"

	tunnelv1 "libtunnel.dev/interop/grpc-go/tunnelv1"
)

// ---- Shared key and hello (core/src/auth.rs, core/src/protocol.rs) ----

type key struct {
	kid    uint32
	secret []byte
}

// parseKey reads KID:BASE64 (auth.rs Key::parse: standard alphabet, padding optional).
func parseKey(s string) (key, error) {
	kid, data, ok := strings.Cut(strings.TrimSpace(s), ":")
	id, err := strconv.ParseUint(strings.TrimSpace(kid), 10, 32)
	if !ok || err != nil {
		return key{}, errors.New("the shared key is written KID:BASE64 (-key or TUNNEL_KEY)")
	}
	secret, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(strings.TrimSpace(data), "="))
	if err != nil || len(secret) == 0 {
		return key{}, fmt.Errorf("the shared key's secret is not non-empty standard base64: %v", err)
	}
	return key{uint32(id), secret}, nil
}

// parseServerConnect checks the relay's preamble, protocol.rs ServerConnect (protobuf: 1
// server_software "emissary-server", 2 server_version, 3 protocol_version 1, 4 connection_nonce
// of 32 bytes), and returns the nonce.
func parseServerConnect(b []byte) ([]byte, error) {
	var software string
	var version int64
	var nonce []byte
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, fmt.Errorf("the relay's preamble is not a ServerConnect: %v", protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			software, n = string(v), m
		case num == 3 && typ == protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			version, n = int64(v), m
		case num == 4 && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			nonce, n = v, m
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return nil, fmt.Errorf("the relay's preamble is not a ServerConnect: %v", protowire.ParseError(n))
		}
		b = b[n:]
	}
	if software != "emissary-server" || version != 1 || len(nonce) != 32 {
		return nil, fmt.Errorf("unexpected preamble (software %q, protocol %d, %d-byte nonce)", software, version, len(nonce))
	}
	return nonce, nil
}

// encodeHello builds the session hello (protocol.rs Hello::encode):
// version u8 (1) | date_len u8 | date | sig_len u8 | sig, where date is an HTTP date and
// sig = base64_nopad(kid u32 BE ‖ HMAC-SHA256(secret, date ‖ 0x00 ‖ base64_nopad(nonce)))
// (auth.rs Key::sign_with_date).
func encodeHello(k key, nonce []byte, now time.Time) []byte {
	date := now.UTC().Format(http.TimeFormat)
	mac := hmac.New(sha256.New, k.secret)
	mac.Write([]byte(date))
	mac.Write([]byte{0})
	mac.Write([]byte(base64.RawStdEncoding.EncodeToString(nonce)))
	proof := binary.BigEndian.AppendUint32(nil, k.kid)
	sig := base64.RawStdEncoding.EncodeToString(mac.Sum(proof))
	out := []byte{1, byte(len(date))}
	out = append(out, date...)
	out = append(out, byte(len(sig)))
	return append(out, sig...)
}

// errorNames are libtunnel's ErrorCode numbers (core/src/error.rs), from 1.
var errorNames = []string{"AUTH_FAILED", "AUTH_UNKNOWN_KEY", "AUTH_CLOCK_SKEW", "NOT_ALLOWED", "UNREACHABLE",
	"REFUSED", "TIMEOUT", "PROTOCOL", "RELAY_UNAVAILABLE", "INVALID_CONFIG", "INVALID_ARGUMENT", "CLOSED", "IO",
	"GENERAL", "NAME_TAKEN", "E2E_IDENTITY", "E2E_REFUSED"}

func codeName(c uint32) string {
	if c >= 1 && int(c) <= len(errorNames) {
		return errorNames[c-1]
	}
	return "code " + strconv.Itoa(int(c))
}

// parseHelloAck reads the relay's answer (protocol.rs HelloAck): status u32 BE (0 = accepted,
// else an ErrorCode number) | msg_len u16 BE | msg.
func parseHelloAck(b []byte) error {
	if len(b) < 6 {
		return fmt.Errorf("malformed answer to the hello (%d bytes)", len(b))
	}
	status := binary.BigEndian.Uint32(b)
	msg := b[6:]
	if l := int(binary.BigEndian.Uint16(b[4:])); l < len(msg) {
		msg = msg[:l]
	}
	if status != 0 {
		return fmt.Errorf("the relay refused the session: [%s] %s", codeName(status), msg)
	}
	return nil
}

// ---- Mux frames (core/src/mux/frame.rs, flow.rs, mod.rs) ----

// A frame is kind u8 | stream_id u32 BE | payload.
const (
	kindOpen   = 1 // empty payload; client streams have odd ids
	kindData   = 2 // stream bytes, consume the receiver's window
	kindWindow = 3 // payload u32 BE: more credit
	kindFin    = 4 // half-close
	kindRst    = 5 // payload: optional u32 BE ErrorCode
	kindPing   = 6 // answered with a Pong carrying the same payload (stream 0)
	kindPong   = 7
	kindGoAway = 8 // payload empty or code u32 BE | reason

	streamID = 1          // our one stream (the first odd id)
	window   = 256 * 1024 // flow.rs WINDOW: every stream's initial credit, both ways
	maxData  = 128 * 1024 // mux/mod.rs MAX_DATA: largest Data payload
	grantAt  = window / 4 // grant after consuming this much (as flow.rs does)
	chunk    = 64 * 1024  // what we put in one Data frame
)

func encodeFrame(kind byte, stream uint32, payload []byte) []byte {
	b := make([]byte, 5, 5+len(payload))
	b[0] = kind
	binary.BigEndian.PutUint32(b[1:], stream)
	return append(b, payload...)
}

type message struct {
	data []byte
	err  error
}

type session struct {
	call     tunnelv1.Tunnel_SessionClient
	in       chan message
	credit   uint32 // what we may still send on our stream (the relay's grants)
	recvLeft uint32 // what the relay may still send us
	unacked  uint32 // consumed, not yet granted back
	fin      bool   // the relay half-closed our stream
	onData   func([]byte)
	received int64
}

// readLoop hands every message of the call to the session, then how the call ended.
func (s *session) readLoop() {
	for {
		f, err := s.call.Recv()
		if err != nil {
			s.in <- message{err: err}
			close(s.in)
			return
		}
		s.in <- message{data: f.GetData()}
	}
}

// send sends one session frame: one gRPC message, Frame{data}.
func (s *session) send(b []byte) error {
	return s.call.Send(&tunnelv1.Frame{Data: b})
}

func (s *session) nextMessage() ([]byte, error) {
	m, ok := <-s.in
	if !ok {
		return nil, io.EOF
	}
	return m.data, m.err
}

// sendData sends stream bytes within the relay's credit (the caller checked it).
func (s *session) sendData(b []byte) error {
	if uint32(len(b)) > s.credit || len(b) > maxData {
		return fmt.Errorf("internal: %d bytes with %d credit", len(b), s.credit)
	}
	s.credit -= uint32(len(b))
	return s.send(encodeFrame(kindData, streamID, b))
}

// nextFrame handles the next frame of the session (waiting for one), and returns its kind.
func (s *session) nextFrame() (byte, error) {
	m, ok := <-s.in
	if !ok {
		return 0, io.EOF
	}
	return s.handle(m)
}

// pollFrame is nextFrame when a message is waiting; 0 when none is.
func (s *session) pollFrame() (byte, error) {
	select {
	case m, ok := <-s.in:
		if !ok {
			return 0, io.EOF
		}
		return s.handle(m)
	default:
		return 0, nil
	}
}

func (s *session) handle(m message) (byte, error) {
	if m.err != nil {
		return 0, m.err
	}
	if len(m.data) < 5 {
		return 0, fmt.Errorf("a %d-byte frame is shorter than its header", len(m.data))
	}
	kind, id, p := m.data[0], binary.BigEndian.Uint32(m.data[1:5]), m.data[5:]
	switch kind {
	case kindData:
		if id != streamID || s.fin {
			return 0, fmt.Errorf("data on stream %d, which is not open", id)
		}
		if uint32(len(p)) > s.recvLeft {
			return 0, fmt.Errorf("the relay sent %d bytes with %d bytes of window", len(p), s.recvLeft)
		}
		s.recvLeft -= uint32(len(p))
		s.onData(p)
		// We consume at once: give the window back once a quarter of it is used.
		s.unacked += uint32(len(p))
		if s.unacked >= grantAt {
			if err := s.send(encodeFrame(kindWindow, streamID, binary.BigEndian.AppendUint32(nil, s.unacked))); err != nil {
				return 0, err
			}
			s.recvLeft += s.unacked
			s.unacked = 0
		}
	case kindWindow:
		if len(p) != 4 {
			return 0, errors.New("malformed window frame")
		}
		if id == streamID {
			s.credit += binary.BigEndian.Uint32(p)
		}
	case kindFin:
		if id == streamID {
			s.fin = true
		}
	case kindRst:
		if id == streamID {
			code := uint32(0)
			if len(p) == 4 {
				code = binary.BigEndian.Uint32(p)
			}
			return 0, fmt.Errorf("the relay reset the stream [%s]", codeName(code))
		}
	case kindPing:
		if err := s.send(encodeFrame(kindPong, 0, p)); err != nil {
			return 0, err
		}
	case kindPong:
	case kindGoAway:
		if len(p) >= 4 {
			fmt.Fprintf(os.Stderr, "grpc-go: the relay is going away [%s] %s\n", codeName(binary.BigEndian.Uint32(p)), p[4:])
		}
	case kindOpen:
		return 0, fmt.Errorf("the relay opened stream %d; a dialer accepts none", id)
	default:
		return 0, fmt.Errorf("unknown frame kind %d", kind)
	}
	return kind, nil
}

// ---- SOCKS5 on the stream (core/src/socks.rs client_connect with a pipelined greeting) ----

// socksConnect is the no-auth greeting 05 01 00 and the CONNECT request
// 05 01 00 ATYP ADDR PORT (ATYP 1 IPv4, 4 IPv6, 3 length-prefixed name).
func socksConnect(target string) ([]byte, error) {
	host, portText, err := net.SplitHostPort(target)
	port, perr := strconv.ParseUint(portText, 10, 16)
	if err != nil || perr != nil || host == "" {
		return nil, fmt.Errorf("target %q must be HOST:PORT", target)
	}
	b := []byte{5, 1, 0, 5, 1, 0}
	if ip := net.ParseIP(host); ip != nil && ip.To4() != nil {
		b = append(append(b, 1), ip.To4()...)
	} else if ip != nil {
		b = append(append(b, 4), ip.To16()...)
	} else if len(host) <= 255 {
		b = append(append(b, 3, byte(len(host))), host...)
	} else {
		return nil, fmt.Errorf("target host %q is longer than 255 bytes", host)
	}
	return binary.BigEndian.AppendUint16(b, uint16(port)), nil
}

var socksReplies = []string{"succeeded", "general failure", "not allowed by the relay's allowlist",
	"network unreachable", "host unreachable", "connection refused", "TTL expired",
	"command not supported", "address type not supported"}

// readSocksReply reads 05 00 (method: no auth), then 05 REP 00 ATYP ADDR PORT
// (socks.rs parse_pipelined_reply); bytes after it are the target's first bytes.
func (s *session) readSocksReply(target string) error {
	var buf []byte
	s.onData = func(p []byte) { buf = append(buf, p...) }
	for {
		if len(buf) >= 6 {
			if buf[0] != 5 || buf[1] != 0 {
				return fmt.Errorf("the relay chose SOCKS5 method %#x", buf[1])
			}
			need := 0
			switch buf[5] {
			case 1:
				need = 4
			case 4:
				need = 16
			case 3:
				if len(buf) > 6 {
					need = 1 + int(buf[6])
				}
			default:
				return fmt.Errorf("SOCKS5 reply with address type %#x", buf[5])
			}
			if need > 0 && len(buf) >= 6+need+2 {
				if rep := buf[3]; rep != 0 {
					why := "reply " + strconv.Itoa(int(rep))
					if int(rep) < len(socksReplies) {
						why = socksReplies[rep]
					}
					hint := ""
					if buf[5] == 3 {
						hint = fmt.Sprintf(" (%s)", buf[7:6+need])
					}
					return fmt.Errorf("the relay refused CONNECT %s: %s%s", target, why, hint)
				}
				s.onData = nil
				rest := buf[6+need+2:]
				if len(rest) > 0 {
					return fmt.Errorf("%d bytes from the target before we sent any", len(rest))
				}
				return nil
			}
		}
		if s.fin {
			return errors.New("the relay ended the stream before its SOCKS5 reply")
		}
		if _, err := s.nextFrame(); err != nil {
			return err
		}
	}
}

// ---- The transfer ----

// pump sends payload within the credit the relay grants, hashing what comes back into h, and
// half-closes once everything is sent; it returns when the relay half-closes the stream.
func (s *session) pump(payload []byte, h hash.Hash) error {
	s.onData = func(p []byte) {
		h.Write(p)
		s.received += int64(len(p))
	}
	off, finSent := 0, false
	for !s.fin {
		var err error
		switch {
		case off < len(payload) && s.credit > 0:
			// Take what has arrived first (grants, echoed bytes), then send one chunk.
			if _, err = s.pollFrame(); err == nil {
				c := min(len(payload)-off, int(s.credit), chunk)
				err = s.sendData(payload[off : off+c])
				off += c
			}
		case off == len(payload) && !finSent:
			err = s.send(encodeFrame(kindFin, streamID, nil))
			finSent = true
		default:
			_, err = s.nextFrame()
		}
		if err != nil {
			return err
		}
	}
	if !finSent {
		return fmt.Errorf("the relay half-closed the stream after %d of %d bytes were sent", off, len(payload))
	}
	return nil
}
