package serve

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// TestGatewayRoutes: a known route with the wrong method answers 405 with Allow, as OpenAI-style
// servers do, and an unknown path 404; both with an OpenAI error body.
func TestGatewayRoutes(t *testing.T) {
	c := newCluster(t, clusterOptions{})
	for _, tc := range []struct {
		method, path string
		status       int
		allow        string
	}{
		{http.MethodGet, "/v1/completions", http.StatusMethodNotAllowed, "POST"},
		{http.MethodPut, "/v1/chat/completions", http.StatusMethodNotAllowed, "POST"},
		{http.MethodPost, "/v1/models", http.StatusMethodNotAllowed, "GET"},
		{http.MethodDelete, "/metrics", http.StatusMethodNotAllowed, "GET"},
		{http.MethodGet, "/v1/embeddings", http.StatusNotFound, ""},
		{http.MethodGet, "/v1/models", http.StatusOK, ""},
	} {
		req, err := http.NewRequest(tc.method, c.gw.URL+tc.path, strings.NewReader("{}"))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var body struct {
			Error *struct {
				Message string `json:"message"`
				Type    string `json:"type"`
			} `json:"error"`
		}
		err = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || resp.Header.Get("Allow") != tc.allow {
			t.Errorf("%s %s: %d Allow %q, want %d Allow %q", tc.method, tc.path, resp.StatusCode, resp.Header.Get("Allow"), tc.status, tc.allow)
		}
		if tc.status != http.StatusOK && (err != nil || body.Error == nil || body.Error.Type != "invalid_request_error" || body.Error.Message == "") {
			t.Errorf("%s %s: error body %+v (%v), want an OpenAI error", tc.method, tc.path, body.Error, err)
		}
	}
}

// TestSetTokensRotates: replacing the tokens (a rotated Secret) takes effect on the next request
// without a restart.
func TestSetTokensRotates(t *testing.T) {
	c := newCluster(t, clusterOptions{tokens: []string{"old"}})
	status := func(token string) int {
		t.Helper()
		req, err := http.NewRequest(http.MethodGet, c.gw.URL+"/v1/models", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := status("old"); got != http.StatusOK {
		t.Fatalf("old token before rotation: %d", got)
	}
	c.gateway.SetTokens([]string{"new", "newer"})
	for _, tc := range []struct {
		token string
		want  int
	}{{"old", http.StatusUnauthorized}, {"new", http.StatusOK}, {"newer", http.StatusOK}, {"", http.StatusUnauthorized}} {
		if got := status(tc.token); got != tc.want {
			t.Errorf("token %q after rotation: %d, want %d", tc.token, got, tc.want)
		}
	}
}
