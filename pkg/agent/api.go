package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"

	"github.com/ftctl/ftctl/pkg/vm"
)

// The control API is JSON over HTTP on the agent's unix socket:
//
//	GET    /v1/vms                 list
//	GET    /v1/vms/{name}          one VM
//	POST   /v1/vms                 start a VM (StartRequest)
//	POST   /v1/vms/{name}/pair     protect it on a peer (PairRequest)
//	POST   /v1/vms/{name}/failover planned switchover to the secondary
//	POST   /v1/vms/{name}/unpair   stop protecting it
//	DELETE /v1/vms/{name}          shut it down
//	GET    /v1/vms/{name}/serial   its serial console so far
//	POST   /v1/domains/{name}/prepare  libvirt domain about to start: open its devices
//	POST   /v1/domains/{name}/adopt    libvirt domain started: take it, pair it
//	POST   /v1/domains/{name}/stopped  libvirt domain stopped: let it go

// StartRequest asks the agent to run a VM.
type StartRequest struct {
	Spec  vm.Spec   `json:"spec"`
	Probe ProbeSpec `json:"probe,omitempty"`
}

// PairRequest names the peer that will hold the replica.
type PairRequest struct {
	Peer string `json:"peer"`
}

// FailoverResult says where the VM went.
type FailoverResult struct {
	Epoch uint64 `json:"epoch"`
}

type apiError struct {
	Error string `json:"error"`
	Kind  string `json:"kind"`
}

var errKinds = []struct {
	err    error
	kind   string
	status int
}{
	{ErrNotFound, "not-found", http.StatusNotFound},
	{ErrExists, "exists", http.StatusConflict},
	{ErrState, "state", http.StatusConflict},
	{ErrBadRequest, "bad-request", http.StatusBadRequest},
	{vm.ErrInvalidSpec, "invalid-spec", http.StatusBadRequest},
	{ErrPeer, "peer", http.StatusBadGateway},
	{ErrUnavailable, "unavailable", http.StatusServiceUnavailable},
}

func writeErr(w http.ResponseWriter, err error) {
	status, kind := http.StatusInternalServerError, "internal"
	for _, k := range errKinds {
		if errors.Is(err, k.err) {
			status, kind = k.status, k.kind
			break
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(apiError{Error: err.Error(), Kind: kind})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func readJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: request body: %v", ErrBadRequest, err)
	}
	return nil
}

func (a *Agent) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		s, err := a.Status("")
		if err != nil {
			writeErr(w, err)
			return
		}
		if s == nil {
			s = []VMStatus{}
		}
		writeJSON(w, s)
	})
	mux.HandleFunc("GET /v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		s, err := a.Status(r.PathValue("name"))
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, s[0])
	})
	mux.HandleFunc("POST /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		var req StartRequest
		if err := readJSON(r, &req); err != nil {
			writeErr(w, err)
			return
		}
		s, err := a.StartVM(r.Context(), req.Spec, req.Probe)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, s)
	})
	mux.HandleFunc("POST /v1/vms/{name}/pair", func(w http.ResponseWriter, r *http.Request) {
		var req PairRequest
		if err := readJSON(r, &req); err != nil {
			writeErr(w, err)
			return
		}
		if req.Peer == "" {
			writeErr(w, fmt.Errorf("%w: peer is empty", ErrBadRequest))
			return
		}
		s, err := a.Pair(context.WithoutCancel(r.Context()), r.PathValue("name"), req.Peer)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, s)
	})
	mux.HandleFunc("POST /v1/vms/{name}/failover", func(w http.ResponseWriter, r *http.Request) {
		n, err := a.Failover(context.WithoutCancel(r.Context()), r.PathValue("name"))
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, FailoverResult{Epoch: n})
	})
	mux.HandleFunc("POST /v1/vms/{name}/unpair", func(w http.ResponseWriter, r *http.Request) {
		if err := a.Unpair(r.Context(), r.PathValue("name")); err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, struct{}{})
	})
	mux.HandleFunc("POST /v1/vms/{name}/resume", func(w http.ResponseWriter, r *http.Request) {
		if err := a.Resume(r.Context(), r.PathValue("name")); err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, struct{}{})
	})
	mux.HandleFunc("GET /v1/vms/{name}/serial", func(w http.ResponseWriter, r *http.Request) {
		b, err := a.Serial(r.PathValue("name"))
		if err != nil {
			writeErr(w, err)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(b)
	})
	a.libvirtRoutes(mux)
	a.shimRoutes(mux)
	mux.HandleFunc("DELETE /v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		if err := a.StopVM(r.Context(), r.PathValue("name")); err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, struct{}{})
	})
	return mux
}

func splitHostPort(s string) (string, string, error) { return net.SplitHostPort(s) }

// Client talks to an agent's control API.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the agent listening on socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}
	return &Client{socket: socket, http: &http.Client{Transport: tr}}
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	return c.doRaw(ctx, method, path, body, func(r io.Reader) error {
		if out == nil {
			return nil
		}
		return json.NewDecoder(r).Decode(out)
	})
}

func (c *Client) doRaw(ctx context.Context, method, path string, body any, read func(io.Reader) error) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = strings.NewReader(string(b))
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://agent"+path, rd)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("no ftctl agent answers on %s (is `ftctl agent` running, and are you root?): %w", c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e apiError
		if json.NewDecoder(resp.Body).Decode(&e) != nil || e.Error == "" {
			return fmt.Errorf("agent answered %s", resp.Status)
		}
		for _, k := range errKinds {
			if k.kind == e.Kind {
				return &remoteError{msg: e.Error, kind: k.err}
			}
		}
		return errors.New(e.Error)
	}
	return read(resp.Body)
}

// remoteError carries the agent's message and its sentinel.
type remoteError struct {
	msg  string
	kind error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.kind }

// List returns every VM the agent knows.
func (c *Client) List(ctx context.Context) ([]VMStatus, error) {
	var s []VMStatus
	return s, c.do(ctx, http.MethodGet, "/v1/vms", nil, &s)
}

// Get returns one VM's status.
func (c *Client) Get(ctx context.Context, name string) (VMStatus, error) {
	var s VMStatus
	return s, c.do(ctx, http.MethodGet, "/v1/vms/"+name, nil, &s)
}

// Start asks the agent to run a VM.
func (c *Client) Start(ctx context.Context, req StartRequest) (VMStatus, error) {
	var s VMStatus
	return s, c.do(ctx, http.MethodPost, "/v1/vms", req, &s)
}

// Pair protects a VM on peer.
func (c *Client) Pair(ctx context.Context, name, peer string) (VMStatus, error) {
	var s VMStatus
	return s, c.do(ctx, http.MethodPost, "/v1/vms/"+name+"/pair", PairRequest{Peer: peer}, &s)
}

// Failover hands a VM over to its secondary.
func (c *Client) Failover(ctx context.Context, name string) (FailoverResult, error) {
	var r FailoverResult
	return r, c.do(ctx, http.MethodPost, "/v1/vms/"+name+"/failover", nil, &r)
}

// Unpair stops protecting a VM.
func (c *Client) Unpair(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodPost, "/v1/vms/"+name+"/unpair", nil, nil)
}

// Resume lets a fenced VM run on alone.
func (c *Client) Resume(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodPost, "/v1/vms/"+name+"/resume", nil, nil)
}

// Stop shuts a VM down.
func (c *Client) Stop(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/vms/"+name, nil, nil)
}

// Serial returns what a VM has written to its serial console.
func (c *Client) Serial(ctx context.Context, name string) ([]byte, error) {
	var b []byte
	err := c.doRaw(ctx, http.MethodGet, "/v1/vms/"+name+"/serial", nil, func(r io.Reader) error {
		var err error
		b, err = io.ReadAll(io.LimitReader(r, 64<<20))
		return err
	})
	return b, err
}
