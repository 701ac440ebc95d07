package hook

import (
	"context"

	"github.com/ftctl/ftctl/pkg/agent"
)

// AgentClient is the Agent of the ftctl agent listening on socket.
func AgentClient(socket string) Agent { return agentClient{agent.NewClient(socket)} }

type agentClient struct{ c *agent.Client }

func (a agentClient) PrepareDomain(ctx context.Context, domain string, domainXML []byte) error {
	return a.c.PrepareDomain(ctx, domain, domainXML)
}

func (a agentClient) AdoptDomain(ctx context.Context, domain string, domainXML []byte, peer string) error {
	_, err := a.c.AdoptDomain(ctx, domain, domainXML, peer)
	return err
}

func (a agentClient) DomainStopped(ctx context.Context, domain string) error {
	return a.c.DomainStopped(ctx, domain)
}
