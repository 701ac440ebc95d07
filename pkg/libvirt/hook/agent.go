package hook

import (
	"context"

	"github.com/ftctl/ftctl/pkg/agent"
)

// AgentClient is the Agent of the ftctl agent listening on socket.
func AgentClient(socket string) Agent { return agentClient{agent.NewClient(socket)} }

type agentClient struct{ c *agent.Client }

func (a agentClient) Pair(ctx context.Context, domain, peer string) error {
	_, err := a.c.Pair(ctx, domain, peer)
	return err
}

func (a agentClient) Unpair(ctx context.Context, domain string) error {
	return a.c.Unpair(ctx, domain)
}
