"""`sara compare`: budget-matched, paired comparisons of adapter methods, built from normal runs
(plan.py: arms, budgets, rates; run.py: the variants, trained and scored; report.py: statistics,
compare.md/json/png; compare.py: the command's modes)."""
