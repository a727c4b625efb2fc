-- Returns are subtracted from what was bought, so a day can never lose money.
select
    revenue_date,
    net_revenue
from {{ ref('daily_revenue') }}
where net_revenue < 0
