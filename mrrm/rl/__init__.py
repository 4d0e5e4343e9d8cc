"""Rewards for RL: the group assembler and the reward functions of TRL and veRL (grpo), the reward server
for OpenRLHF and others (serve), and taking a policy's templated query apart (queries)."""
