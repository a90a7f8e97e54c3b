"""Rewrite: graph surgery (prune / mask / skip a block) and the replacement modules it builds."""
