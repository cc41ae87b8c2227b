"""HTTP interfaces of the node: operations endpoints, and later the CPaaS REST and CTI APIs."""
