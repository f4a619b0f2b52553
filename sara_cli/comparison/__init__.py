"""`sara compare`: budget-matched, paired comparisons of adapter methods, built from normal runs
(plan.py: arms, budgets, rates, variants; run.py: train and score them; report.py: statistics,
compare.md/json/png)."""
